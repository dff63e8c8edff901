"""The shared inference worker: payload decoding (bytes or raw arrays) and per-image failures in a batch.

Both front ends (``serve`` and the Triton Python-backend model) rely on these two promises: a
raw array gets the decoder's limits, and a bad image in a batch fails alone.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from fakes import FakeInspector
from PIL import Image

from o2n_edge.data.images import ImageError
from o2n_edge.runtime.types import InspectResult
from o2n_edge.runtime.worker import InspectWorker, decode_payload, inspect_payloads


def png(value: int, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_payload_bytes_and_raw() -> None:
    raw = np.full((20, 30, 3), 7, np.uint8)
    assert np.array_equal(decode_payload(png(7, 20)), np.full((20, 20, 3), 7, np.uint8))
    assert decode_payload(raw) is not None and decode_payload(raw).shape == (20, 30, 3)
    for bad in (raw.astype(np.float32), raw[..., :2], raw[:4], np.zeros((20, 30), np.uint8)):
        with pytest.raises(ImageError):
            decode_payload(bad, "cam")
    with pytest.raises(ImageError):
        decode_payload(b"not an image")


def test_bad_image_fails_alone_in_a_batch() -> None:
    insp = FakeInspector()
    payloads = [png(10), b"\x89PNG broken", np.full((16, 16, 3), 200, np.uint8), b""]
    out = inspect_payloads(insp, payloads)
    assert [type(r) for r in out] == [InspectResult, ImageError, InspectResult, ImageError]
    assert out[0].score == pytest.approx(10.0) and out[2].score == pytest.approx(200.0)
    assert insp.calls == 2  # only the good ones reached the inspector


def test_worker_queue_is_bounded() -> None:
    w = InspectWorker(max_queue=2, workers=1)
    assert w.reserve() and w.reserve() and not w.reserve()
    w.release()
    assert w.reserve()
    w.shutdown()


class DraftInspector(FakeInspector):
    """An inspector with its own decoder, as OrtPipeline has for JPEG-draft bundles."""

    def __init__(self) -> None:
        super().__init__()
        self.decoded: list[str] = []

    def decode(self, data: bytes, name: str = "<bytes>") -> np.ndarray:
        self.decoded.append(name)
        return np.full((24, 24, 3), 50, np.uint8)


def test_payloads_go_through_the_inspectors_own_decoder() -> None:
    insp = DraftInspector()
    out = inspect_payloads(insp, [png(10), np.full((16, 16, 3), 200, np.uint8)], ["a.png", "raw"])
    assert insp.decoded == ["a.png"]  # bytes through the bundle's decoder; raw arrays need none
    assert out[0].score == pytest.approx(50.0) and out[1].score == pytest.approx(200.0)
    assert inspect_payloads(FakeInspector(), [png(10)])[0].score == pytest.approx(10.0)
