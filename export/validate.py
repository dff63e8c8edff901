"""Compare an exported ONNX graph with its torch module; fail (not warn) past the tolerance.

Why it fails by default: optimum's exporter only warns when the ONNX outputs drift, and its
users ship broken graphs. Here an export that does not match torch raises
:class:`ExportValidationError` and is never written (``onnx_export`` validates before commit).

What is compared:

- random inputs at every ``spec.validation_shapes`` entry, which must include a shape other
  than the traced one (a batch size frozen into the graph by tracing is the classic trap);
- ``real_inputs`` when given (real images / latents / prompt embeddings): fp16 overflow shows on
  real activations, rarely on randn;
- any NaN/Inf in an ONNX output where torch is finite is an error whatever the tolerance.

The error measure is ``max |onnx - torch|`` per output (returned), checked against
``tolerance[precision] * max(1, max |torch|)``: absolute for O(1) outputs (noise, pixels),
relative for large-magnitude features.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from o2n_edge._lazy import require
from o2n_edge.runtime.bundle import ORT_DISABLED_OPTIMIZERS

from .fp16 import nonfinite_outputs
from .specs import ExportSpec

torch = require("torch", "export validation")

log = logging.getLogger(__name__)

PROVIDERS = ["CPUExecutionProvider"]  # the reference runtime: available everywhere


class ExportValidationError(RuntimeError):
    """ONNX outputs differ from torch past the tolerance (or are non-finite)."""

    def __init__(self, message: str, errors: dict[str, float] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or {}


def real_cases(real_inputs: Any) -> list[tuple[Any, ...]]:
    """Accept one input tuple (or a single tensor) or a list of input tuples."""
    if real_inputs is None:
        return []
    if isinstance(real_inputs, (torch.Tensor, np.ndarray)):
        return [(real_inputs,)]
    items = list(real_inputs)
    if items and isinstance(items[0], (torch.Tensor, np.ndarray)):
        return [tuple(items)]
    return [tuple(c) if isinstance(c, (tuple, list)) else (c,) for c in items]


def _to_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _to_torch(x: Any) -> Any:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


def validation_cases(spec: ExportSpec, real_inputs: Any = None) -> list[tuple[str, tuple[Any, ...]]]:
    """(label, inputs) of every comparison: seeded random inputs at each validation shape,
    then the real inputs. Also the inputs of the fp16 range audit."""
    cases: list[tuple[str, tuple[Any, ...]]] = [
        (f"random batch={b} size={s}", spec.make_inputs(b, s, seed=1 + i))
        for i, (b, s) in enumerate(spec.validation_shapes)
    ]
    cases += [(f"real input #{i}", c) for i, c in enumerate(real_cases(real_inputs))]
    return cases


def case_feeds(spec: ExportSpec, inputs: tuple[Any, ...]) -> dict[str, np.ndarray]:
    """onnxruntime feed dict of one case."""
    return {n: _to_numpy(x) for n, x in zip(spec.input_names, inputs)}


def make_session(
    onnx_path: str | Path,
    providers: Sequence[Any] | None = None,
    precision: str = "fp32",
) -> Any:
    """An onnxruntime session on CPU (or ``providers``), opened the way the runtime opens it.

    fp16 graphs get ``ORT_DISABLED_OPTIMIZERS["fp16"]`` (an onnxruntime segfault, see
    ``o2n_edge.runtime.bundle``).
    """
    ort = require("onnxruntime", "export validation")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(
        str(onnx_path), sess_options=opts, providers=list(providers or PROVIDERS),
        disabled_optimizers=list(ORT_DISABLED_OPTIMIZERS.get(precision, ())),
    )


def validate(
    onnx_path: str | Path,
    torch_module: Any,
    spec: ExportSpec,
    precision: str,
    real_inputs: Any = None,
    providers: Sequence[Any] | None = None,
) -> dict[str, float]:
    """Max abs error per output over all cases; raises :class:`ExportValidationError` when bad.

    ``torch_module`` is the export wrapper (``spec.wrap(model)``) in fp32; it is run in eval
    mode and restored afterwards.
    """
    if precision not in spec.tolerance:
        raise ValueError(f"no tolerance for precision {precision!r} in spec {spec.name}")
    tol = float(spec.tolerance[precision])
    sess = make_session(onnx_path, providers, precision)
    in_names = [i.name for i in sess.get_inputs()]
    out_names = [o.name for o in sess.get_outputs()]
    if in_names != list(spec.input_names) or out_names != list(spec.output_names):
        raise ExportValidationError(
            f"{spec.name}: graph I/O {in_names} -> {out_names} != spec "
            f"{list(spec.input_names)} -> {list(spec.output_names)}"
        )
    traced = (spec.trace_batch, spec.size)
    if all(s == traced for s in spec.validation_shapes):
        raise ValueError(f"{spec.name}: validation shapes must include one other than {traced}")

    cases = validation_cases(spec, real_inputs)

    errors = {n: 0.0 for n in spec.output_names}
    failures: list[str] = []
    was_training = bool(getattr(torch_module, "training", False))
    torch_module.eval()
    try:
        for label, xs in cases:
            if len(xs) != len(spec.input_names):
                raise ValueError(f"{label}: {len(xs)} inputs, spec {spec.name} has {len(spec.input_names)}")
            with torch.no_grad():
                ref = torch_module(*[_to_torch(x) for x in xs])
            ref = ref if isinstance(ref, (tuple, list)) else (ref,)
            got = sess.run(None, case_feeds(spec, xs))
            got_map = dict(zip(spec.output_names, got))
            bad = nonfinite_outputs(got_map)
            for name, r, g in zip(spec.output_names, ref, got):
                r = _to_numpy(r).astype(np.float64)
                g = np.asarray(g).astype(np.float64)
                if r.shape != g.shape:
                    failures.append(f"{label}: {name} shape {g.shape} != torch {r.shape}")
                    errors[name] = float("inf")
                    continue
                if name in bad and np.isfinite(r).all():
                    failures.append(f"{label}: {name} has {bad[name]} NaN/Inf values (torch has none)")
                    errors[name] = float("inf")
                    continue
                finite = np.isfinite(r) & np.isfinite(g)
                err = float(np.abs(r - g)[finite].max()) if finite.any() else 0.0
                scale = max(1.0, float(np.abs(r[finite]).max()) if finite.any() else 1.0)
                errors[name] = max(errors[name], err)
                if err > tol * scale:
                    failures.append(
                        f"{label}: {name} max abs error {err:.3g} > {tol:g} x scale {scale:.3g}"
                    )
    finally:
        torch_module.train(was_training)
    if failures:
        raise ExportValidationError(
            f"{spec.name} ({precision}) does not match torch:\n  " + "\n  ".join(failures), errors
        )
    log.info("%s (%s) validated: %s", spec.name, precision, {k: f"{v:.2e}" for k, v in errors.items()})
    return errors
