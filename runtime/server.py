"""The line-side HTTP server: images in, logged verdicts out.

Design points (each one a failure seen in similar tools):

- Bad input is the client's problem, never a crash: every rejection is a 4xx JSON body
  ``{"error": ..., "detail": ...}``, decided *before* any work is queued, and it writes nothing
  to the results log. Only a server bug gives 500, and that answer carries no traceback.
- Bounded everything: body size (Content-Length *and* the bytes actually streamed, since
  chunked uploads have no Content-Length), multipart parts, and a queue of at most
  ``max_queue`` requests in flight or waiting; past that the answer is 503 + Retry-After at
  once, instead of latency growing without bound and memory with it.
- Decoding, inference, PNG encoding and the log write run in a pool of ``workers`` threads, so
  the event loop keeps answering /healthz, /metrics and 503s while a model runs.
- A decision is committed to the :class:`ResultsLog` before its answer is sent: the line never
  acts on a verdict that is not on record.
- Graceful shutdown: uvicorn stops accepting, lets in-flight requests finish (up to
  ``graceful_timeout_s``), then the worker pool drains.

- Learning from the line: ``--keep-images`` keeps each inspected image (:mod:`image_store`),
  ``POST /v1/feedback`` stores an operator's verdict (:mod:`feedback_api`), and a new bundle
  is swapped in without dropping or mixing requests (:mod:`reload`): each request takes the
  inspector once, at its start, and its answer and log row name that bundle's hash.

This module holds the inspect route and the app's assembly; the parts read alone: request
parsing and error answers (:mod:`http_input`), the bounded inference worker (:mod:`worker`,
shared with the Triton model), the Prometheus metrics (:mod:`prometheus`), the operator page
(:mod:`operator_page`), verdicts (:mod:`feedback_api`) and reloads (:mod:`reload`).

Runtime rule: numpy + pillow + fastapi/uvicorn only; nothing here may import torch.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import uvicorn
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from o2n_edge.data.images import ImageError
from o2n_edge.runtime.feedback_api import feedback_router
from o2n_edge.runtime.http_input import (
    INSPECT_BODY_DOC,
    ApiError,
    bearer_checker,
    error_response,
    image_from_multipart,
    is_multipart,
    read_body,
)
from o2n_edge.runtime.prometheus import CONTENT_TYPE, MetricsMiddleware, ServerMetrics
from o2n_edge.runtime.operator_page import page_router
from o2n_edge.runtime.image_store import ImageStore
from o2n_edge.runtime.reload import InspectorSlot, Loader, install_sighup, reload_router
from o2n_edge.runtime.results_log import ResultsLog
from o2n_edge.runtime.types import Inspector
from o2n_edge.runtime.worker import MAX_QUEUE, WORKERS, InspectWorker, inspect_and_log

__all__ = ["MAX_QUEUE", "WORKERS", "create_app", "make_server", "run_server", "serve"]

logger = logging.getLogger("o2n_edge.server")

# A 20 MiB body holds any sane camera frame as PNG/JPEG; larger is refused unread.
MAX_BODY_BYTES = 20 * 1024 * 1024
# Seconds a 503'd client should wait; the queue drains in about this long.
RETRY_AFTER_S = 1
# How long shutdown waits for in-flight requests before cancelling them.
GRACEFUL_TIMEOUT_S = 30.0
# /v1/results page sizes.
RESULTS_LIMIT_DEFAULT = 50
RESULTS_LIMIT_MAX = 1000
# A client-provided X-Request-ID is echoed only if it is this tame.
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")



def _add_error_handlers(app: FastAPI) -> None:
    """Every non-200 answer as ``{"error", "detail"}``; a 500 never carries a traceback."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        rid = getattr(request.state, "request_id", None)
        extra = {"request_id": rid} if rid else {}
        return error_response(exc.status, exc.error, exc.detail, exc.headers, **extra)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = {404: "not found", 405: "method not allowed"}.get(exc.status_code, "http error")
        return error_response(exc.status_code, error, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err.get("loc", ()))
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return error_response(422, "invalid request", "; ".join(parts) or "invalid request")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = getattr(request.state, "request_id", None)
        logger.error("unexpected error (request %s)", rid, exc_info=exc)
        return error_response(
            500, "internal error", "unexpected server error; see the server log", request_id=rid
        )


def create_app(
    inspector: Inspector,
    log: ResultsLog,
    token: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_queue: int = MAX_QUEUE,
    workers: int = WORKERS,
    *,
    admin_token: str | None = None,
    bundle_path: str | Path | None = None,
    loader: Loader | None = None,
    store: ImageStore | None = None,
) -> FastAPI:
    """Build the ASGI app around one loaded inspector and one results log.

    The caller owns both (and closes the log); the app owns its worker pool and shuts it down
    with the app's lifespan. ``admin_token`` enables ``POST /v1/admin/reload``, which loads
    ``bundle_path`` (or the path it is given) with ``loader`` (default: ONNX Runtime with the
    current inspector's options); ``store`` keeps every inspected image.
    """
    assert max_body_bytes > 0 and max_queue > 0 and workers > 0, "limits must be positive"
    worker = InspectWorker(max_queue, workers)
    metrics = ServerMetrics(
        lambda: worker.pending, max_queue, inspector.bundle_hash, float(inspector.threshold)
    )
    slot = InspectorSlot(
        inspector, bundle_path, loader,
        on_swap=lambda new: metrics.set_bundle(new.bundle_hash, float(new.threshold)),
    )
    if store is not None:
        store.on_failure = metrics.keep_failure
    require_token = bearer_checker(token)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        worker.shutdown()  # in-flight jobs finish; their rows are logged

    app = FastAPI(
        title="o2n-edge inspection server",
        version="1",
        summary="Few-shot visual anomaly detection (One-to-Normal) on the line.",
        lifespan=lifespan,
    )
    app.state.o2n = worker
    app.state.metrics = metrics
    app.state.slot = slot
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    _add_error_handlers(app)

    @app.post(
        "/v1/inspect",
        dependencies=[Depends(require_token)],
        openapi_extra=INSPECT_BODY_DOC,
        summary="Inspect one image",
    )
    async def inspect(
        request: Request,
        want_map: bool = Query(False, alias="map", description="add the anomaly map as PNG"),
        want_views: bool = Query(
            False, alias="views", description="add query/normal/overlay PNGs"
        ),
        source: str | None = Query(None, max_length=200, description="e.g. line/camera id"),
    ) -> JSONResponse:
        """Score one image; the decision is in the results log before this answers.

        ``timings_ms`` (milliseconds): the inspector's own stages (its ``total`` included), plus
        the server's ``queue`` (waiting for a worker), ``decode``, ``inspect`` (the whole
        inspector call), ``encode`` (optional PNGs), ``log`` (durable commit) and ``request``
        (from queueing to answer; excludes the upload itself). The logged row carries the
        same stages except ``log`` and ``request``.
        """
        current = slot.current  # this request's inspector, from start to answer
        given_id = request.headers.get("x-request-id", "")
        rid = given_id if REQUEST_ID_RE.match(given_id) else uuid.uuid4().hex
        request.state.request_id = rid
        multipart = is_multipart(request)
        if not worker.reserve():
            metrics.reject()
            raise ApiError(
                503,
                "busy",
                f"{worker.pending} requests in flight or waiting (max_queue={worker.max_queue})",
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        try:
            body = await read_body(request, max_body_bytes)
            if multipart:
                data, name = await image_from_multipart(request, body)
            else:
                data, name = body, "request body"
            client = request.client.host if request.client else "unknown"
            src = source if source is not None else f"http {client}"
            queued_at = time.perf_counter()
            try:
                answer = await worker.run(
                    inspect_and_log, current, log, data, name, want_map, want_views, src,
                    queued_at, rid, store,
                )
            except ImageError as exc:
                raise ApiError(400, "invalid image", str(exc))
            except Exception:  # a bug or a broken bundle: log it whole, answer without it
                logger.exception("inspect failed (request %s)", rid)
                raise ApiError(500, "internal error", "inspection failed; see the server log")
            answer["timings_ms"]["request"] = round((time.perf_counter() - queued_at) * 1000, 3)
        finally:
            worker.release()
        metrics.decision(answer["anomalous"])
        answer["request_id"] = rid
        return JSONResponse(answer, headers={"X-Request-ID": rid})

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: inspector loaded and log writable")
    def readyz() -> JSONResponse:
        inspector = slot.current
        problems = []
        if inspector is None or not getattr(inspector, "bundle_hash", None):
            problems.append("no inspector loaded")
        ok, detail = log.writable()
        if not ok:
            problems.append(detail)
        if problems:
            return error_response(503, "not ready", "; ".join(problems))
        return JSONResponse(
            {
                "status": "ready",
                "bundle_hash": inspector.bundle_hash,
                "threshold": float(inspector.threshold),
                "image_size": int(inspector.image_size),
                "log": detail,
                "max_queue": worker.max_queue,
                "queue_depth": worker.pending,
                "auth": token is not None,
                "reload": admin_token is not None,
                "reloads": slot.reloads,
                "keep_images": str(store.directory) if store is not None else None,
            }
        )

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get(
        "/v1/results", dependencies=[Depends(require_token)], summary="Latest logged results"
    )
    def results(
        limit: int = Query(RESULTS_LIMIT_DEFAULT, ge=1, le=RESULTS_LIMIT_MAX),
        since: str | None = Query(None, description="ISO-8601 time (UTC if no zone)"),
    ) -> JSONResponse:
        try:
            rows = log.read(since=since, limit=limit, newest_first=True)
        except ValueError as exc:
            raise ApiError(400, "bad request", str(exc))
        return JSONResponse({"total": log.count(), "results": rows})

    app.include_router(feedback_router(log, store, require_token, metrics.feedback))
    app.include_router(reload_router(slot, admin_token, metrics.reload))
    app.include_router(page_router())
    return app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_server(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 8080,
    graceful_timeout_s: float = GRACEFUL_TIMEOUT_S,
    log_level: str = "info",
) -> uvicorn.Server:
    """A configured (not started) uvicorn server: ``serve`` runs it, tests run it in a thread."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        timeout_graceful_shutdown=graceful_timeout_s,
        log_level=log_level,
        server_header=False,
        proxy_headers=False,
        lifespan="on",
    )
    return uvicorn.Server(config)


def serve(
    inspector: Inspector,
    log: ResultsLog,
    host: str = "127.0.0.1",
    port: int = 8080,
    token: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_queue: int = MAX_QUEUE,
    workers: int = WORKERS,
    graceful_timeout_s: float = GRACEFUL_TIMEOUT_S,
    log_level: str = "info",
    *,
    admin_token: str | None = None,
    bundle_path: str | Path | None = None,
    loader: Loader | None = None,
    store: ImageStore | None = None,
) -> None:
    """Run the server until SIGINT/SIGTERM; in-flight requests finish before it returns.

    SIGHUP reloads ``bundle_path`` (see :mod:`reload`) when one is given.
    """
    if token is None and not _is_loopback(host):
        logger.warning(
            "serving on %s without a token: anyone on the network can submit images and "
            "read results (pass a token)",
            host,
        )
    app = create_app(
        inspector, log, token, max_body_bytes, max_queue, workers,
        admin_token=admin_token, bundle_path=bundle_path, loader=loader, store=store,
    )
    if bundle_path is not None:
        install_sighup(app.state.slot, app.state.metrics.reload)
    make_server(app, host, port, graceful_timeout_s, log_level).run()


def run_server(
    inspector: Inspector,
    log_path: str | Path,
    host: str = "127.0.0.1",
    port: int = 8080,
    token: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_queue: int = MAX_QUEUE,
    workers: int = WORKERS,
    *,
    admin_token: str | None = None,
    bundle_path: str | Path | None = None,
    loader: Loader | None = None,
    store: ImageStore | None = None,
) -> None:
    """CLI glue for ``o2n-edge serve``: open the results log, serve, close the log."""
    log = ResultsLog(log_path)
    try:
        serve(
            inspector, log, host, port, token, max_body_bytes, max_queue, workers,
            admin_token=admin_token, bundle_path=bundle_path, loader=loader, store=store,
        )
    finally:
        log.close()
