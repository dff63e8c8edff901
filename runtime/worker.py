"""The bounded inference worker: untrusted payloads in, verdicts out, at most ``max_queue`` at once.

Why its own module: both front ends run the same steps on an accepted request. ``o2n-edge
serve`` queues one request at a time into :class:`InspectWorker` (a bounded queue + a thread
pool, so the event loop keeps answering /healthz, /metrics and 503s while a model runs); the
Triton Python-backend model (``o2n_edge.triton``) gets a batch of requests from Triton's dynamic
batcher and calls :func:`inspect_payloads` on it. Either way an image is decoded by the one
decoder the offline stage uses, a bad image fails alone (never its batch neighbours), and the
good ones go through the inspector's public ``inspect_batch``.

Runtime rule: numpy + pillow only; nothing here may import torch.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
from PIL import Image

from o2n_edge.data.images import MAX_PIXELS, MIN_SIDE, ImageError, decode_image
from o2n_edge.runtime import render
from o2n_edge.runtime.image_store import ImageStore
from o2n_edge.runtime.results_log import ResultsLog
from o2n_edge.runtime.types import InspectResult, Inspector

# Requests in flight + waiting. 8 at ~100 ms each is under a second of backlog.
MAX_QUEUE = 8
# Inference threads. 1 keeps one model run at a time (the usual case on a small GPU/CPU box).
WORKERS = 1

T = TypeVar("T")
Payload = bytes | np.ndarray


class InspectWorker:
    """A thread pool behind a counter: at most ``max_queue`` jobs in flight or waiting.

    ``pending`` is touched only on the event loop thread (reserve/release), so it needs no lock;
    a caller that cannot reserve answers 503 at once instead of letting latency grow unbounded.
    """

    def __init__(self, max_queue: int = MAX_QUEUE, workers: int = WORKERS) -> None:
        assert max_queue > 0 and workers > 0, "limits must be positive"
        self.max_queue = max_queue
        self.pending = 0
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="o2n-inspect")

    def reserve(self) -> bool:
        """Take a queue slot; False when the queue is full."""
        if self.pending >= self.max_queue:
            return False
        self.pending += 1
        return True

    def release(self) -> None:
        self.pending -= 1

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on a worker thread (the caller holds a slot)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def shutdown(self) -> None:
        """Let queued jobs finish (their rows get logged), then stop the threads."""
        self._executor.shutdown(wait=True)


def decoder_of(inspector: Any) -> Callable[[bytes, str], np.ndarray]:
    """The inspector's own decoder when it has one, else the plain one.

    A bundle exported with JPEG draft decoding must be fed images decoded the same way at the
    line (``OrtPipeline.decode``), or its scores drift from the ones it was calibrated on.
    """
    return getattr(inspector, "decode", None) or decode_image


def decode_payload(
    payload: Payload, name: str = "<bytes>", decode: Callable[[bytes, str], np.ndarray] = decode_image
) -> np.ndarray:
    """Encoded image bytes, or a raw uint8 (H, W, 3) array, -> uint8 RGB; ImageError otherwise.

    Raw arrays get the same limits as decoded files (smallest side, pixel bomb), so a client
    cannot reach the model with what the decoder would have refused.
    """
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return decode(bytes(payload), name)
    arr = np.asarray(payload)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageError(f"{name}: raw image must be uint8 (H, W, 3), got {arr.dtype} {arr.shape}")
    h, w = int(arr.shape[0]), int(arr.shape[1])
    if min(h, w) < MIN_SIDE:
        raise ImageError(f"{name}: image is {w}x{h}, smaller than {MIN_SIDE}x{MIN_SIDE}")
    if h * w > MAX_PIXELS:
        raise ImageError(f"{name}: image of {w}x{h} pixels exceeds {MAX_PIXELS} pixels")
    return np.ascontiguousarray(arr)


def inspect_payloads(
    inspector: Inspector, payloads: Sequence[Payload], names: Sequence[str] | None = None
) -> list[InspectResult | ImageError]:
    """One verdict (or the ImageError that refused it) per payload, in order.

    The good images go through one ``inspector.inspect_batch`` call, so a batch Triton formed
    runs as one batch; a corrupt image in it fails alone.
    """
    names = list(names) if names is not None else [f"image {i}" for i in range(len(payloads))]
    out: list[InspectResult | ImageError] = []
    good: list[np.ndarray] = []
    where: list[int] = []
    for i, (payload, name) in enumerate(zip(payloads, names)):
        try:
            good.append(decode_payload(payload, name, decoder_of(inspector)))
            where.append(i)
            out.append(ImageError("not inspected"))  # replaced below
        except ImageError as exc:
            out.append(exc)
    if good:
        for i, result in zip(where, inspector.inspect_batch(good)):
            out[i] = result
    return out


def _thumbnail(image: np.ndarray, size: int) -> np.ndarray:
    """The decoded image at the scoring size, for views when the inspector gave no query."""
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


def encode_extras(
    result: InspectResult, image: np.ndarray, size: int, want_map: bool, want_views: bool
) -> dict[str, Any]:
    """The optional PNG payloads of an HTTP answer (?map=1, ?views=1)."""
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


def inspect_and_log(
    inspector: Inspector,
    log: ResultsLog,
    data: bytes,
    name: str,
    want_map: bool,
    want_views: bool,
    source: str,
    queued_at: float,
    request_id: str | None = None,
    store: ImageStore | None = None,
) -> dict[str, Any]:
    """Worker-thread job of ``serve``: decode, inspect, encode, log, keep; ImageError on bad input.

    The decision is committed to the log (with ``request_id``, so a verdict can find it) before
    the answer exists, so the line never acts on a verdict that is not on record. With a
    ``store`` the original bytes are kept after the log write; a store that cannot keep them
    logs and counts that, and the answer goes out regardless. ``inspector`` is the one this
    request was given at its start: the answer and the row name its bundle hash even if a
    reload swaps the server's inspector meanwhile.
    """
    t0 = time.perf_counter()
    sha = hashlib.sha256(data).hexdigest()
    image = decode_payload(data, name, decoder_of(inspector))
    t1 = time.perf_counter()
    result = inspector.inspect(image)
    t2 = time.perf_counter()
    extras = encode_extras(result, image, inspector.image_size, want_map, want_views)
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
        request_id=request_id,
    )
    t4 = time.perf_counter()
    timings["log"] = (t4 - t3) * 1000.0
    kept = store.keep(data, sha) if store is not None else None
    if store is not None:
        timings["keep"] = (time.perf_counter() - t4) * 1000.0
    answer = result.to_json()
    answer["timings_ms"] = {k: round(v, 3) for k, v in timings.items()}
    answer.update(
        image_sha256=sha,
        log_id=row_id,
        bundle_hash=inspector.bundle_hash,
        **({"kept": kept is not None} if store is not None else {}),
        image_size={"height": int(image.shape[0]), "width": int(image.shape[1])},
        **extras,
    )
    return answer
