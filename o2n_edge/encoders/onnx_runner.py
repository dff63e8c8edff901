"""Offline feature encoding on onnxruntime, through the encoder's own ONNX graph.

Why: ``eval`` and ``export`` encode every shot in six views and every test image, and many good
images mean thousands of encodes. On one CPU thread onnxruntime runs the traced graph of
EfficientNet-Lite0 at 448 px about three times faster than torch runs the module (the 1,200
views of 200 good images: 73 s instead of 208 s, ``benchmarks/results/bank_build.md``). It is
also the computation the line-side runtime performs, so the memory bank and the device's
queries come from one graph.

The graph is traced in memory the first time an opted-in encoder encodes on the CPU (half a
second for Lite0), checked against torch on one seeded batch, and kept for that encoder. An
encoder opts in with ``onnx_encoding = True`` (the Lite encoders; the CLIP encoders of the
diffusion profiles stay on torch). ``O2N_ENCODE_BACKEND=torch`` turns it off, e.g. to compare.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
import weakref

from typing import TYPE_CHECKING

import numpy as np

from .._lazy import require

if TYPE_CHECKING:
    from .base import FeatureEncoder

torch = require("torch", "the feature encoders")

log = logging.getLogger(__name__)

ENV_BACKEND = "O2N_ENCODE_BACKEND"  # "torch" forces the torch path; anything else: auto
OPSET = 17
# The traced graph must reproduce torch within float32 noise (measured: 2e-5 on features of
# magnitude 20); a larger gap means the trace is wrong, and torch is used instead.
CHECK_RTOL = 1e-3
CHECK_ATOL = 1e-3
# encoder -> its runner (False: torch encodes it); weak, so a dropped encoder drops its session
_RUNNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class EncoderWrapper(torch.nn.Module):
    """FeatureEncoder dict -> tuple in ``output_names`` order (ONNX outputs are positional).

    The bundle export traces it too, so the offline graph and the shipped one are the same module.
    """

    def __init__(self, encoder: "FeatureEncoder", output_names: tuple[str, ...] | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.output_names = tuple(output_names or encoder.output_names)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.encoder(pixels)
        missing = [k for k in self.output_names if k not in out]
        assert not missing, f"encoder output lacks {missing}"
        return tuple(out[k] for k in self.output_names)


class OnnxEncoderRunner:
    """One encoder's traced graph on a CPU onnxruntime session: (B,3,S,S) float32 -> outputs."""

    def __init__(self, encoder: "FeatureEncoder", threads: int) -> None:
        import onnxruntime as ort

        self.output_names = tuple(encoder.output_names)
        size = int(encoder.image_size)
        buf = io.BytesIO()
        # eval(): the exporter restores the wrapper's mode afterwards, and a fresh module is in
        # training mode, which would leave the encoder's BatchNorms on batch statistics
        wrapper = EncoderWrapper(encoder).eval()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarnings on shape arithmetic are expected
            torch.onnx.export(
                wrapper, (torch.zeros(1, 3, size, size),), buf, input_names=["pixels"],
                output_names=list(self.output_names), opset_version=OPSET, do_constant_folding=True,
                dynamic_axes={"pixels": {0: "batch"}}, dynamo=False,
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, int(threads))
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])
        self.threads = options.intra_op_num_threads

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """Run image by image: one image at a time measured faster than batches on the CPU."""
        x = np.ascontiguousarray(pixels, dtype=np.float32)
        parts = [self.session.run(list(self.output_names), {"pixels": x[i:i + 1]}) for i in range(len(x))]
        return {name: np.concatenate([p[j] for p in parts], axis=0) for j, name in enumerate(self.output_names)}

    def agrees_with(self, encoder: "FeatureEncoder") -> float | None:
        """None if the graph reproduces torch on a seeded batch, else the largest difference."""
        size = int(encoder.image_size)
        probe = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            want = {k: v.float().numpy() for k, v in encoder(probe).items()}
        got = self(probe.numpy())
        worst = max(float(np.abs(got[k] - want[k]).max()) for k in self.output_names)
        ok = all(np.allclose(got[k], want[k], rtol=CHECK_RTOL, atol=CHECK_ATOL) for k in self.output_names)
        return None if ok else worst


def onnx_runner_for(encoder: "FeatureEncoder") -> OnnxEncoderRunner | None:
    """The encoder's onnxruntime runner, built once; None where torch must encode.

    None when the encoder has not opted in, sits on a GPU, onnxruntime is not installed, the
    environment forces torch, or the traced graph disagrees with torch (logged as a warning).
    """
    if not getattr(encoder, "onnx_encoding", False) or os.environ.get(ENV_BACKEND, "").lower() == "torch":
        return None
    try:
        if next(encoder.parameters()).device.type != "cpu":
            return None
    except StopIteration:  # pragma: no cover - every real encoder has parameters
        return None
    threads = torch.get_num_threads()
    cached = _RUNNERS.get(encoder)
    if cached is False:
        return None
    if cached is not None and cached.threads == threads:
        return cached
    return _build(encoder, threads)


def _build(encoder: "FeatureEncoder", threads: int) -> OnnxEncoderRunner | None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        _RUNNERS[encoder] = False
        return None
    runner = OnnxEncoderRunner(encoder, threads)
    worst = runner.agrees_with(encoder)
    if worst is not None:
        log.warning("the traced %s graph differs from torch by %.3g: encoding with torch", type(encoder).__name__, worst)
        _RUNNERS[encoder] = False
        return None
    _RUNNERS[encoder] = runner
    return runner


__all__ = ["ENV_BACKEND", "EncoderWrapper", "OnnxEncoderRunner", "onnx_runner_for"]
