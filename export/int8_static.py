"""Calibrated (static) int8 quantization of a bundle's graphs, in the QDQ format.

Why static and calibrated: dynamic int8 (weights int8, activation ranges computed per batch at
run time) lost 0.24 image AUROC on the tire and ran 4.6x slower on the CPU
(``benchmarks/results/variants_lite.md``, ``ort_knobs_lite.md``). Static quantization fixes every
activation's range beforehand from real inputs, and its QDQ graphs (QuantizeLinear /
DequantizeLinear pairs around each op) are the format both onnxruntime (CPU) and TensorRT
(explicit quantization) consume. Measured (``variants_lite.md``): harmless for the lite UNet,
still 0.19 AUROC on the tire for the EfficientNet-Lite0 encoder, whose patch distances are the
score; so only the UNet is a candidate.

Calibration inputs are recorded, not synthesized: the fp32 bundle runs on held-out good images
(never the test set) and every input it feeds the UNet and the image encoder is kept, so the
ranges are those of the real transform (noisy latents at the bundle's timesteps) and of real
query and normal-version pixels.

No torch here: this runs wherever onnxruntime does.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

QUANTIZED = ("unet", "image_encoder")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


class _Recorder:
    """Wraps a session and keeps a copy of every feed it runs (the calibration set)."""

    def __init__(self, session: Any, feeds: list[dict[str, np.ndarray]]) -> None:
        self._session = session
        self._feeds = feeds

    def run(self, output_names: Any, feed: dict[str, np.ndarray], *args: Any, **kwargs: Any) -> Any:
        self._feeds.append({k: np.array(v, copy=True) for k, v in feed.items()})
        return self._session.run(output_names, feed, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def record_calibration_feeds(bundle: Path, images: Sequence[np.ndarray], names: Sequence[str] = QUANTIZED,
                             threads: int = 1) -> dict[str, list[dict[str, np.ndarray]]]:
    """Run the fp32 bundle on ``images`` (one at a time) and return every feed of ``names``."""
    from o2n_edge.runtime.pipeline import OrtPipeline, SessionOptions

    pipe = OrtPipeline(bundle, SessionOptions(intra_op_threads=threads))
    feeds: dict[str, list[dict[str, np.ndarray]]] = {n: [] for n in names if n in pipe.sessions}
    for n, store in feeds.items():
        pipe.sessions[n] = _Recorder(pipe.sessions[n], store)
    for img in images:
        pipe.inspect(img)
    return feeds


class _FeedReader:
    """onnxruntime's CalibrationDataReader over recorded feeds (split to batch 1)."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._items = [{k: v[i : i + 1] for k, v in f.items()} for f in feeds for i in range(len(next(iter(f.values()))))]
        self._it: Iterator[dict[str, np.ndarray]] = iter(self._items)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._items)


def quantize_qdq(src: Path, dst: Path, feeds: Sequence[dict[str, np.ndarray]], method: str = "minmax",
                 per_channel: bool = True) -> Path:
    """Write a QDQ int8 copy of ``src`` calibrated on ``feeds`` (activations uint8, weights int8)."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}")
    if not feeds:
        raise ValueError(f"{src.name}: no calibration inputs recorded")
    calib = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
             "entropy": CalibrationMethod.Entropy}[method]
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp.onnx")
    quantize_static(str(src), str(tmp), _FeedReader(feeds), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=calib,
                    extra_options={"CalibMovingAverage": False})
    tmp.replace(dst)
    return dst


def static_int8_overrides(bundle: Path, images: Sequence[np.ndarray], cache_dir: Path, method: str = "minmax",
                          names: Sequence[str] = QUANTIZED) -> dict[str, Path]:
    """Calibrate on ``images`` and quantize ``names`` once (cached); returns name -> QDQ graph path.

    The cache key covers the bundle's manifest hash, the calibration images' bytes and the method,
    so a different calibration set never reuses stale graphs.
    """
    from o2n_edge.runtime.bundle import load_bundle

    b = load_bundle(bundle)
    h = hashlib.sha256(str(b.manifest["manifest_sha256"]).encode())
    for img in images:
        h.update(np.ascontiguousarray(img).tobytes())
    h.update(method.encode())
    out_dir = Path(cache_dir) / f"qdq-{h.hexdigest()[:16]}"
    wanted = [n for n in names if n in b.manifest["models"]]
    paths = {n: (out_dir / f"{n}.int8.qdq.onnx").resolve() for n in wanted}
    missing = [n for n in wanted if not paths[n].is_file()]
    if missing:
        log.info("recording calibration inputs on %d images for %s", len(images), ", ".join(missing))
        feeds = record_calibration_feeds(bundle, images, missing)
        for n in missing:
            quantize_qdq(b.model_path(n), paths[n], feeds[n], method)
    return paths


__all__ = ["CALIBRATION_METHODS", "QUANTIZED", "quantize_qdq", "record_calibration_feeds", "static_int8_overrides"]
