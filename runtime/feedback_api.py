"""``POST /v1/feedback``: an operator's verdict ("good part" or "defect") on one logged decision.

Why its own router: the verdict path shares nothing with inference but the token and the
results log, and its error answers are a contract of their own (the operator page and line
integrations act on them): unknown request id 404, a label other than good/defect 422, a
second verdict on the same request 409 (the answer carries the stored one), a verdict on an
image that is no longer kept 410, missing/wrong token 401. A refused verdict changes nothing.

Runtime rule: nothing here may import torch.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from o2n_edge.runtime.feedback_log import MAX_NOTE_CHARS, FeedbackError, ImageNotKept
from o2n_edge.runtime.http_input import error_response
from o2n_edge.runtime.image_store import ImageStore
from o2n_edge.runtime.results_log import ResultsLog


class FeedbackBody(BaseModel):
    """What the operator page (or a line integration) sends."""

    request_id: str = Field(..., min_length=1, max_length=64, description="request_id of the inspection answer")
    label: Literal["good", "defect"] = Field(..., description="the operator's verdict")
    note: str | None = Field(None, max_length=MAX_NOTE_CHARS, description="free text, optional")


def feedback_router(
    log: ResultsLog,
    store: ImageStore | None,
    require_token: Callable[[Request], None],
    on_stored: Callable[[str], None] | None = None,
) -> APIRouter:
    """The verdict route; ``store`` is the kept-image store (None when images are not kept)."""
    router = APIRouter()

    def image_still_kept(result: dict[str, Any]) -> None:
        sha = str(result["image_sha256"])
        if store is not None and not store.is_kept(sha):
            raise ImageNotKept(
                f"image {sha[:12]}... of request {result['request_id']!r} is no longer kept in "
                f"{store.directory} (removed by retention, never written, or modified); "
                "a verdict needs the image it judges"
            )

    @router.post(
        "/v1/feedback",
        dependencies=[Depends(require_token)],
        status_code=201,
        summary="Store an operator verdict on an inspection",
        responses={
            404: {"description": "unknown request_id"},
            409: {"description": "the request already has a verdict (returned as 'verdict')"},
            410: {"description": "the inspected image is no longer kept"},
            422: {"description": "label is not 'good' or 'defect', or a malformed body"},
        },
    )
    async def feedback(body: FeedbackBody, request: Request) -> JSONResponse:
        """Store the verdict with who gave it, when, and the score and bundle it answers."""
        who = request.client.host if request.client else "unknown"
        try:
            record = await asyncio.to_thread(
                log.add_feedback, body.request_id, body.label, body.note, who, None, image_still_kept
            )
        except FeedbackError as exc:
            extra = {"verdict": exc.record} if exc.record is not None else {}
            return error_response(exc.status, exc.error, exc.detail, request_id=body.request_id, **extra)
        except ValueError as exc:
            return error_response(422, "invalid request", str(exc))
        if on_stored is not None:
            on_stored(record["label"])
        return JSONResponse(record, status_code=201)

    return router
