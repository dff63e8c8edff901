"""Test doubles. NOT a model: nothing here detects anomalies.

:class:`FakeInspector` implements the runtime's ``Inspector`` protocol with arithmetic that is
deterministic and cheap, so the server, the results log and the operator page can be tested
(including under load and in a real browser) without a bundle, onnxruntime sessions or a GPU:

- score     = mean brightness of the resized query (0..255);
- decision  = score > threshold (default 128: bright images are "anomalous");
- map       = a left-to-right gradient scaled by the score, so it is never constant;
- normal    = the query box-blurred (a stand-in for the diffusion model's normal version);
- timings   = fixed fake stage names, measured for real.

``delay_s`` adds a sleep inside ``inspect`` to emulate inference time; ``started`` is set each
time an inspection begins (for graceful-shutdown tests); ``fail_with`` makes ``inspect`` raise,
to test the server's 500 path.

:func:`write_fake_bundle` / :func:`load_fake_bundle` stand in for a bundle directory and its
verified loading, for the hot-reload tests: a JSON file whose sha256 is the bundle hash, and a
loader that refuses the directory when the file no longer matches its recorded hash.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageFilter

from o2n_edge.runtime.types import InspectResult

FAKE_BUNDLE_HASH = hashlib.sha256(b"o2n-edge fake bundle for tests").hexdigest()
DEFAULT_THRESHOLD = 128.0
DEFAULT_SIZE = 64
BLUR_RADIUS = 2


class FakeInspector:
    """Deterministic stand-in for the ONNX pipeline (see the module docstring)."""

    def __init__(
        self,
        threshold: float = DEFAULT_THRESHOLD,
        image_size: int = DEFAULT_SIZE,
        delay_s: float = 0.0,
        fail_with: BaseException | None = None,
        with_normal: bool = True,
        with_map: bool = True,
        bundle_hash: str = FAKE_BUNDLE_HASH,
    ) -> None:
        self.bundle_hash = bundle_hash
        self.threshold = float(threshold)
        self.image_size = int(image_size)
        self.delay_s = float(delay_s)
        self.fail_with = fail_with
        self.with_normal = with_normal
        self.with_map = with_map
        self.started = threading.Event()
        self._lock = threading.Lock()
        self.calls = 0

    def expected_score(self, image: np.ndarray) -> float:
        """The score :meth:`inspect` gives ``image``: tests compare against this."""
        return float(self._resize(image).mean())

    def inspect(self, image: np.ndarray) -> InspectResult:
        """One uint8 (H, W, 3) RGB image -> a deterministic verdict."""
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, image.shape
        with self._lock:
            self.calls += 1
        self.started.set()
        t0 = time.perf_counter()
        if self.fail_with is not None:
            raise self.fail_with
        if self.delay_s:
            time.sleep(self.delay_s)
        query = self._resize(image)
        t1 = time.perf_counter()
        score = float(query.mean())
        s = self.image_size
        gradient = np.linspace(0.0, 1.0, s, dtype=np.float32)[None, :].repeat(s, axis=0)
        anomaly_map = gradient * np.float32(score / 255.0 + 0.1) if self.with_map else None
        normal = None
        if self.with_normal:
            blurred = Image.fromarray(query).filter(ImageFilter.BoxBlur(BLUR_RADIUS))
            normal = np.asarray(blurred, dtype=np.uint8)
        t2 = time.perf_counter()
        timings = {
            "preprocess": (t1 - t0) * 1000.0,
            "transform": (t2 - t1) * 1000.0,
            "total": (t2 - t0) * 1000.0,
        }
        return InspectResult(
            score=score,
            decision=score > self.threshold,
            threshold=self.threshold,
            timings_ms=timings,
            anomaly_map=anomaly_map,
            query=query,
            normal=normal,
        )

    def inspect_batch(self, images: Sequence[np.ndarray]) -> list[InspectResult]:
        """One result per image, in order."""
        return [self.inspect(im) for im in images]

    def _resize(self, image: np.ndarray) -> np.ndarray:
        s = self.image_size
        if image.shape[:2] == (s, s):
            return np.ascontiguousarray(image)
        return np.asarray(Image.fromarray(image).resize((s, s), Image.Resampling.BILINEAR))


# -- fake bundles, for hot reload --------------------------------------------------------------

FAKE_BUNDLE_FILE = "fake_bundle.json"
FAKE_BUNDLE_SHA = "fake_bundle.sha256"


def write_fake_bundle(path: Path, threshold: float = DEFAULT_THRESHOLD, tag: str = "a") -> str:
    """A directory standing in for a bundle; returns its hash (what its inspector answers with)."""
    path.mkdir(parents=True, exist_ok=True)
    doc = json.dumps({"threshold": threshold, "tag": tag}).encode()
    digest = hashlib.sha256(doc).hexdigest()
    (path / FAKE_BUNDLE_FILE).write_bytes(doc)
    (path / FAKE_BUNDLE_SHA).write_text(digest)
    return digest


def load_fake_bundle(path: Path, delay_s: float = 0.0, load_s: float = 0.0) -> FakeInspector:
    """Verify and open a fake bundle (``load_s`` emulates a slow load); BundleError when corrupt."""
    from o2n_edge.runtime.bundle import BundleError

    time.sleep(load_s)
    try:
        doc = (Path(path) / FAKE_BUNDLE_FILE).read_bytes()
        want = (Path(path) / FAKE_BUNDLE_SHA).read_text().strip()
    except OSError as exc:
        raise BundleError(f"{path}: not a bundle ({exc})") from exc
    digest = hashlib.sha256(doc).hexdigest()
    if digest != want:
        raise BundleError(f"{FAKE_BUNDLE_FILE}: sha256 mismatch (corrupted or modified)")
    threshold = float(json.loads(doc)["threshold"])
    return FakeInspector(threshold=threshold, delay_s=delay_s, bundle_hash=digest)


# -- a real server on loopback, for the load and browser tests ---------------------------------

LOOPBACK = "127.0.0.1"  # tests never bind anything but loopback
SERVER_START_TIMEOUT_S = 15.0


class ServerThread:
    """A real uvicorn server for one app, on 127.0.0.1 and an ephemeral port, in a thread.

    Binding the socket here (port 0) and handing it to uvicorn avoids the race of picking a
    "free" port first. ``stop()`` asks for uvicorn's graceful shutdown (what SIGTERM does).
    """

    def __init__(self, app: object, graceful_timeout_s: float = 10.0) -> None:
        import socket

        import uvicorn

        from o2n_edge.runtime.server import make_server

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((LOOPBACK, 0))
        self.port = int(self.sock.getsockname()[1])
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.server: uvicorn.Server = make_server(
            app, LOOPBACK, self.port, graceful_timeout_s, log_level="warning"
        )
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def start(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 15.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
