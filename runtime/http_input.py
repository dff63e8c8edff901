"""Reading untrusted HTTP requests: bounded bodies, multipart forms, bearer tokens, error answers.

Why its own module: every rule here is about what a client may send (and what it gets back when
it sends something wrong), independent of what the server does with an accepted image. Every
rejection is an :class:`ApiError`, answered as a 4xx JSON body ``{"error", "detail"}`` before
any work is queued.

Runtime rule: nothing here may import torch.
"""

from __future__ import annotations

import hmac
from typing import Any, Callable

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

# Multipart field names accepted for the image (curl -F image=@x.png, or browsers' "file").
IMAGE_FIELDS = ("image", "file")
# A form upload carries one image; a few extra parts are tolerated, thousands are not.
MAX_FORM_FILES = 4
MAX_FORM_FIELDS = 16
MAX_FORM_PART_BYTES = 64 * 1024  # non-file fields only; files are bounded by the body limit
# Raw bodies: any image/* type, or untyped bytes.
RAW_TYPES = ("application/octet-stream", "")
MAX_NAME_CHARS = 100

# The OpenAPI text of POST /v1/inspect's body and refusals (the route reads the body itself).
INSPECT_BODY_DOC = {
    "requestBody": {
        "required": True,
        "description": "The image: a multipart form with a file field 'image' (or 'file'), "
        "or the raw bytes with Content-Type image/* or application/octet-stream.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"image": {"type": "string", "format": "binary"}},
                    "required": ["image"],
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "responses": {
        str(code): {"description": text}
        for code, text in (
            (400, "not a usable image (empty, corrupt, truncated, too small, too large)"),
            (401, "missing or wrong bearer token"),
            (413, "body over the size limit"),
            (415, "unsupported Content-Type"),
            (422, "multipart form without an image file field"),
            (503, "queue full; retry after Retry-After seconds"),
        )
    },
}


class ApiError(Exception):
    """A deliberate non-200 answer: status + short error + human detail (+ headers)."""

    def __init__(
        self, status: int, error: str, detail: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers or {}


def error_response(
    status: int, error: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    """The one shape every non-200 answer has."""
    return JSONResponse({"error": error, "detail": detail, **extra}, status, headers=headers)


def mime(request: Request) -> str:
    """The request's media type, lower-cased, without parameters."""
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def is_multipart(request: Request) -> bool:
    """True for a form upload, False for raw image bytes; 415 for anything else."""
    kind = mime(request)
    if kind == "multipart/form-data":
        return True
    if kind.startswith("image/") or kind in RAW_TYPES:
        return False
    raise ApiError(
        415,
        "unsupported media type",
        f"Content-Type {kind!r} is not accepted; send multipart/form-data (field "
        "'image' or 'file'), image/*, or application/octet-stream",
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing (413) as soon as it passes ``limit`` bytes.

    Content-Length is checked first (nothing read), then the streamed size (chunked uploads
    and lying headers).
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise ApiError(400, "bad request", f"invalid Content-Length {declared[:40]!r}")
        if n > limit:
            raise ApiError(413, "payload too large", f"body of {n} bytes exceeds {limit} bytes")
    chunks, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise ApiError(413, "payload too large", f"body exceeds {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "client disconnected", "the request body was not fully received")
    return b"".join(chunks)


async def image_from_multipart(request: Request, body: bytes) -> tuple[bytes, str]:
    """Parse an already size-checked multipart body; return (file bytes, name)."""
    delivered = False

    async def replay() -> dict:
        nonlocal delivered
        if delivered:
            return {"type": "http.disconnect"}
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    buffered = Request(request.scope, replay)
    try:
        form = await buffered.form(
            max_files=MAX_FORM_FILES,
            max_fields=MAX_FORM_FIELDS,
            max_part_size=MAX_FORM_PART_BYTES,
        )
    except StarletteHTTPException as exc:  # starlette maps MultiPartException to 400
        raise ApiError(400, "malformed multipart body", str(exc.detail))
    except Exception as exc:  # noqa: BLE001 - any parser failure on untrusted bytes is input
        raise ApiError(400, "malformed multipart body", f"{type(exc).__name__}: {exc}")
    try:
        for field in IMAGE_FIELDS:
            item = form.get(field)
            if item is None:
                continue
            if isinstance(item, str):
                raise ApiError(
                    422, "missing image", f"form field {field!r} must be a file upload, not text"
                )
            name = (item.filename or field)[:MAX_NAME_CHARS]
            return await item.read(), name
        fields = ", ".join(sorted(form.keys())[:MAX_FORM_FIELDS]) or "none"
        raise ApiError(
            422,
            "missing image",
            f"multipart form needs a file field named 'image' or 'file' (got: {fields})",
        )
    finally:
        await form.close()


def bearer_checker(token: str | None) -> Callable[[Request], None]:
    """A dependency that enforces ``Authorization: Bearer <token>`` when a token is set."""
    expected = token.encode("utf-8") if token else None

    def check(request: Request) -> None:
        if expected is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(
                401,
                "unauthorized",
                "missing bearer token (send 'Authorization: Bearer <token>')",
                {"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(given.strip().encode("utf-8"), expected):
            raise ApiError(
                401, "unauthorized", "wrong bearer token", {"WWW-Authenticate": "Bearer"}
            )

    return check
