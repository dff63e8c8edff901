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

Runtime rule: numpy + pillow + fastapi/uvicorn only; nothing here may import torch.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import re
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import numpy as np
import uvicorn
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from o2n_edge.data.images import ImageError, decode_image
from o2n_edge.runtime import render
from o2n_edge.runtime.results_log import ResultsLog
from o2n_edge.runtime.types import InspectResult, Inspector

logger = logging.getLogger("o2n_edge.server")

# A 20 MiB body holds any sane camera frame as PNG/JPEG; larger is refused unread.
MAX_BODY_BYTES = 20 * 1024 * 1024
# Requests in flight + waiting. 8 at ~100 ms each is under a second of backlog.
MAX_QUEUE = 8
# Inference threads. 1 keeps one model run at a time (the usual case on a small GPU/CPU box).
WORKERS = 1
# Seconds a 503'd client should wait; the queue drains in about this long.
RETRY_AFTER_S = 1
# How long shutdown waits for in-flight requests before cancelling them.
GRACEFUL_TIMEOUT_S = 30.0
# /v1/results page sizes.
RESULTS_LIMIT_DEFAULT = 50
RESULTS_LIMIT_MAX = 1000
# Latency histogram buckets (seconds), Prometheus' defaults stretched to slow CPU inference.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Multipart field names accepted for the image (curl -F image=@x.png, or browsers' "file").
IMAGE_FIELDS = ("image", "file")
# A form upload carries one image; a few extra parts are tolerated, thousands are not.
MAX_FORM_FILES = 4
MAX_FORM_FIELDS = 16
MAX_FORM_PART_BYTES = 64 * 1024  # non-file fields only; files are bounded by the body limit
# Raw bodies: any image/* type, or untyped bytes.
RAW_TYPES = ("application/octet-stream", "")
# A client-provided X-Request-ID is echoed only if it is this tame.
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
MAX_NAME_CHARS = 100
STATIC_DIR = Path(__file__).resolve().parent / "static"
PAGE_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; script-src 'self' 'unsafe-inline'; "
    "style-src 'self' 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'"
)


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


def _error_response(
    status: int, error: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail, **extra}, status, headers=headers)


class Metrics:
    """Counters behind /metrics, in Prometheus' text format (hand-written: no extra dependency).

    Updated only from the event loop thread (middleware and endpoint bodies), read there too;
    the lock is for callers in other threads (tests, embedding code).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.decisions: Counter[str] = Counter({"normal": 0, "anomalous": 0})
        self.rejected = 0
        self.bucket_counts = [0] * len(LATENCY_BUCKETS_S)
        self.latency_sum = 0.0
        self.latency_count = 0

    def observe(self, path: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(path, status)] += 1
            if path == "/v1/inspect":
                self.latency_sum += seconds
                self.latency_count += 1
                for i, bound in enumerate(LATENCY_BUCKETS_S):
                    if seconds <= bound:
                        self.bucket_counts[i] += 1

    def decision(self, anomalous: bool) -> None:
        with self._lock:
            self.decisions["anomalous" if anomalous else "normal"] += 1

    def reject(self) -> None:
        with self._lock:
            self.rejected += 1

    def render(self, queue_depth: int, max_queue: int, bundle_hash: str, threshold: float) -> str:
        """The exposition text (format 0.0.4)."""
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")

        with self._lock:
            family("o2n_http_requests_total", "counter", "HTTP requests by route and status.")
            for (path, status), n in sorted(self.requests.items()):
                lines.append(
                    f'o2n_http_requests_total{{path="{_label(path)}",status="{status}"}} {n}'
                )
            family(
                "o2n_inspect_latency_seconds",
                "histogram",
                "Server-side latency of POST /v1/inspect, every status.",
            )
            for bound, n in zip(LATENCY_BUCKETS_S, self.bucket_counts):
                lines.append(f'o2n_inspect_latency_seconds_bucket{{le="{bound}"}} {n}')
            lines.append(f'o2n_inspect_latency_seconds_bucket{{le="+Inf"}} {self.latency_count}')
            lines.append(f"o2n_inspect_latency_seconds_sum {self.latency_sum:.6f}")
            lines.append(f"o2n_inspect_latency_seconds_count {self.latency_count}")
            family("o2n_decisions_total", "counter", "Logged decisions by outcome.")
            for outcome in ("normal", "anomalous"):
                n = self.decisions[outcome]
                lines.append(f'o2n_decisions_total{{decision="{outcome}"}} {n}')
            family("o2n_rejected_total", "counter", "Requests refused with 503 (queue full).")
            lines.append(f"o2n_rejected_total {self.rejected}")
        family("o2n_queue_depth", "gauge", "Inspect requests in flight or waiting.")
        lines.append(f"o2n_queue_depth {queue_depth}")
        family("o2n_queue_capacity", "gauge", "max_queue: depth at which requests get 503.")
        lines.append(f"o2n_queue_capacity {max_queue}")
        family("o2n_threshold", "gauge", "Decision threshold of the loaded bundle.")
        lines.append(f"o2n_threshold {threshold}")
        family("o2n_bundle_info", "gauge", "The loaded bundle (value is always 1).")
        lines.append(f'o2n_bundle_info{{bundle_hash="{_label(bundle_hash)}"}} 1')
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    """Escape a Prometheus label value."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _MetricsMiddleware:
    """Pure ASGI middleware: counts every HTTP request by matched route and final status."""

    def __init__(self, app: Callable[..., Awaitable[None]], metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"  # bounded label set
            self.metrics.observe(path, status[0], time.perf_counter() - start)


class _State:
    """Mutable per-app state; ``pending`` is touched only on the event loop thread."""

    def __init__(self, max_queue: int) -> None:
        self.pending = 0
        self.max_queue = max_queue


def _mime(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def _read_body(request: Request, limit: int) -> bytes:
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


async def _image_from_multipart(request: Request, body: bytes) -> tuple[bytes, str]:
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


def _thumbnail(image: np.ndarray, size: int) -> np.ndarray:
    """The decoded image at the scoring size, for views when the inspector gave no query."""
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


def _encode_extras(
    result: InspectResult, image: np.ndarray, size: int, want_map: bool, want_views: bool
) -> dict[str, Any]:
    """The optional PNG payloads (?map=1, ?views=1)."""
    out: dict[str, Any] = {}
    amap = result.anomaly_map
    if want_map:
        if amap is None:
            out["anomaly_map"] = None
        else:
            png, lo, hi = render.map_png_gray(amap)
            out["anomaly_map"] = {
                "png_base64": render.b64(png),
                "min": lo,
                "max": hi,
                "shape": list(np.asarray(amap).shape),
                "encoding": "8-bit gray; value = min + gray / 255 * (max - min)",
            }
    if want_views:
        query = result.query if result.query is not None else _thumbnail(image, size)
        out["views"] = {
            "query": render.png_base64(query),
            "normal": render.png_base64(result.normal) if result.normal is not None else None,
            "overlay": render.png_base64(render.overlay(query, amap)) if amap is not None else None,
        }
    return out


def _bearer_checker(token: str | None) -> Callable[[Request], None]:
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


def create_app(
    inspector: Inspector,
    log: ResultsLog,
    token: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_queue: int = MAX_QUEUE,
    workers: int = WORKERS,
) -> FastAPI:
    """Build the ASGI app around one loaded inspector and one results log.

    The caller owns both (and closes the log); the app owns its worker pool and shuts it down
    with the app's lifespan.
    """
    assert max_body_bytes > 0 and max_queue > 0 and workers > 0, "limits must be positive"
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="o2n-inspect")
    metrics = Metrics()
    state = _State(max_queue)
    require_token = _bearer_checker(token)
    page_path = STATIC_DIR / "index.html"
    page = page_path.read_text(encoding="utf-8") if page_path.is_file() else None

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        executor.shutdown(wait=True)  # in-flight jobs finish; their rows are logged

    app = FastAPI(
        title="o2n-edge inspection server",
        version="1",
        summary="Few-shot visual anomaly detection (One-to-Normal) on the line.",
        lifespan=lifespan,
    )
    app.state.o2n = state
    app.state.metrics = metrics
    app.add_middleware(_MetricsMiddleware, metrics=metrics)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        rid = getattr(request.state, "request_id", None)
        extra = {"request_id": rid} if rid else {}
        return _error_response(exc.status, exc.error, exc.detail, exc.headers, **extra)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = {404: "not found", 405: "method not allowed"}.get(exc.status_code, "http error")
        return _error_response(exc.status_code, error, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err.get("loc", ()))
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return _error_response(422, "invalid request", "; ".join(parts) or "invalid request")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = getattr(request.state, "request_id", None)
        logger.error("unexpected error (request %s)", rid, exc_info=exc)
        return _error_response(
            500, "internal error", "unexpected server error; see the server log", request_id=rid
        )

    def process(
        data: bytes, name: str, want_map: bool, want_views: bool, source: str, queued_at: float
    ) -> dict[str, Any]:
        """Worker-thread job: decode, inspect, encode, log. Raises ImageError on bad input."""
        t0 = time.perf_counter()
        sha = hashlib.sha256(data).hexdigest()
        image = decode_image(data, name)
        t1 = time.perf_counter()
        result = inspector.inspect(image)
        t2 = time.perf_counter()
        extras = _encode_extras(result, image, inspector.image_size, want_map, want_views)
        t3 = time.perf_counter()
        timings = {
            "queue": (t0 - queued_at) * 1000.0,
            "decode": (t1 - t0) * 1000.0,
            **{k: float(v) for k, v in result.timings_ms.items()},
            "inspect": (t2 - t1) * 1000.0,
            "encode": (t3 - t2) * 1000.0,
        }
        row_id = log.append(
            image_sha256=sha,
            score=result.score,
            decision=result.decision,
            threshold=result.threshold,
            bundle_hash=inspector.bundle_hash,
            timings=timings,
            source=source,
        )
        timings["log"] = (time.perf_counter() - t3) * 1000.0
        answer = result.to_json()
        answer["timings_ms"] = {k: round(v, 3) for k, v in timings.items()}
        answer.update(
            image_sha256=sha,
            log_id=row_id,
            bundle_hash=inspector.bundle_hash,
            image_size={"height": int(image.shape[0]), "width": int(image.shape[1])},
            **extras,
        )
        return answer

    inspect_body_doc = {
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

    @app.post(
        "/v1/inspect",
        dependencies=[Depends(require_token)],
        openapi_extra=inspect_body_doc,
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
        given_id = request.headers.get("x-request-id", "")
        rid = given_id if REQUEST_ID_RE.match(given_id) else uuid.uuid4().hex
        request.state.request_id = rid
        mime = _mime(request)
        if mime == "multipart/form-data":
            multipart = True
        elif mime.startswith("image/") or mime in RAW_TYPES:
            multipart = False
        else:
            raise ApiError(
                415,
                "unsupported media type",
                f"Content-Type {mime!r} is not accepted; send multipart/form-data (field "
                "'image' or 'file'), image/*, or application/octet-stream",
            )
        if state.pending >= state.max_queue:
            metrics.reject()
            raise ApiError(
                503,
                "busy",
                f"{state.pending} requests in flight or waiting (max_queue={state.max_queue})",
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        state.pending += 1
        try:
            body = await _read_body(request, max_body_bytes)
            if multipart:
                data, name = await _image_from_multipart(request, body)
            else:
                data, name = body, "request body"
            client = request.client.host if request.client else "unknown"
            src = source if source is not None else f"http {client}"
            loop = asyncio.get_running_loop()
            queued_at = time.perf_counter()
            try:
                answer = await loop.run_in_executor(
                    executor, process, data, name, want_map, want_views, src, queued_at
                )
            except ImageError as exc:
                raise ApiError(400, "invalid image", str(exc))
            except Exception:  # a bug or a broken bundle: log it whole, answer without it
                logger.exception("inspect failed (request %s)", rid)
                raise ApiError(500, "internal error", "inspection failed; see the server log")
            answer["timings_ms"]["request"] = round((time.perf_counter() - queued_at) * 1000, 3)
        finally:
            state.pending -= 1
        metrics.decision(answer["anomalous"])
        answer["request_id"] = rid
        return JSONResponse(answer, headers={"X-Request-ID": rid})

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: inspector loaded and log writable")
    def readyz() -> JSONResponse:
        problems = []
        if inspector is None or not getattr(inspector, "bundle_hash", None):
            problems.append("no inspector loaded")
        ok, detail = log.writable()
        if not ok:
            problems.append(detail)
        if problems:
            return _error_response(503, "not ready", "; ".join(problems))
        return JSONResponse(
            {
                "status": "ready",
                "bundle_hash": inspector.bundle_hash,
                "threshold": float(inspector.threshold),
                "image_size": int(inspector.image_size),
                "log": detail,
                "max_queue": state.max_queue,
                "queue_depth": state.pending,
                "auth": token is not None,
            }
        )

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics_endpoint() -> PlainTextResponse:
        text = metrics.render(
            state.pending, state.max_queue, inspector.bundle_hash, float(inspector.threshold)
        )
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

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

    @app.get("/", include_in_schema=False)
    async def operator_page() -> HTMLResponse:
        if page is None:
            raise ApiError(404, "not found", f"operator page not installed ({page_path})")
        return HTMLResponse(
            page, headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"}
        )

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
) -> None:
    """Run the server until SIGINT/SIGTERM; in-flight requests finish before it returns."""
    if token is None and not _is_loopback(host):
        logger.warning(
            "serving on %s without a token: anyone on the network can submit images and "
            "read results (pass a token)",
            host,
        )
    app = create_app(inspector, log, token, max_body_bytes, max_queue, workers)
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
) -> None:
    """CLI glue for ``o2n-edge serve``: open the results log, serve, close the log."""
    log = ResultsLog(log_path)
    try:
        serve(inspector, log, host, port, token, max_body_bytes, max_queue, workers)
    finally:
        log.close()
