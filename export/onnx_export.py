"""torch -> ONNX export of one submodel: export, simplify, (fp16), validate, commit — idempotently.

Why ``torch.onnx.export`` directly rather than optimum's exporter: we export *bare submodels*
through our own wrappers (``specs.py``: scaled VAE latent mean, tuple outputs of a
FeatureEncoder, LCM's timestep_cond) and validate them our own way (a shape other than the
traced one, real inputs, failure instead of a warning). optimum's ``main_export`` wants a whole
hub pipeline or a registered architecture and its ``OnnxConfig`` classes; we keep the useful
part of that design (one spec per submodel) without its model-id plumbing.

Why the TorchScript exporter (``dynamo=False``): in this environment the dynamo exporter is not
usable at all (it needs ``onnxscript``, which the ``build`` extra does not ship), and on these
models the TorchScript tracer gives a correct dynamic-batch graph in well under a second for the
tiny profile; validation at a different batch proves the batch axis really is dynamic. Switch
by passing ``dynamo=True`` once ``onnxscript`` is installed and validated.

Stages, each skipped when its artifact is current (a staged, idempotent export): a sidecar ``<out>.json`` records the *input hash* (weights + configs + wrapper source + spec +
precision + options + producing versions) and the output's sha256. A later call with the same
inputs and an intact output returns the recorded report with ``skipped=True``; ``force=True``
redoes it. The graph is built and validated in a temp dir beside the output and moved in only
when valid; the sidecar is written last, so a crash never leaves a file that looks current.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from o2n_edge._lazy import require
from o2n_edge.atomic import atomic_write_text
from o2n_edge.runtime.engine_cache import model_digest

from o2n_edge.runtime.bundle_writer import producing_versions
from .export_record import (  # noqa: F401 (sidecar_path and state_digest re-exported)
    HASH_VERSIONS,
    ExportReport,
    _inputs_digest,
    _read_sidecar,
    input_hash,
    sidecar_path,
    state_digest,
)
from .fp16 import name_nodes, convert_to_fp16, fp16_range_audit
from .specs import ExportSpec
from .validate import case_feeds, validate, validation_cases

torch = require("torch", "the ONNX export")
onnx = require("onnx", "the ONNX export")

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")
# Protobuf cannot serialize a message over 2 GiB; past 1 GiB of weights we already switch to
# external data, far from the limit (an SD-1.5 UNet is 3.4 GB in fp32, 1.7 GB in fp16).
EXTERNAL_DATA_THRESHOLD = 2**30
EXTERNAL_MIN_TENSOR = 1024  # bytes: smaller tensors stay inline
def _io_description(
    model: Any, spec: ExportSpec, traced_shapes: dict[str, list[int]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Input/output contract for the manifest: dtypes from the final graph, shapes from the
    traced run with the spec's dynamic axes as symbols.

    ONNX shape inference sometimes leaves a static dim symbolic (e.g. ``Transposepatch_dim_3``
    after a concat); the runtime needs the real value, so the traced shape wins.
    """
    from onnx import helper

    def describe(values: Any) -> dict[str, Any]:
        out = {}
        for v in values:
            tt = v.type.tensor_type
            dims: list[Any] = [d.dim_param if d.dim_param else int(d.dim_value) for d in tt.shape.dim]
            if v.name in traced_shapes:
                dims = list(traced_shapes[v.name])
                for axis, sym in spec.dynamic_axes.get(v.name, {}).items():
                    dims[axis] = sym
            dtype = str(helper.tensor_dtype_to_np_dtype(tt.elem_type))
            out[v.name] = {"shape": dims, "dtype": dtype}
        return out

    return describe(model.graph.input), describe(model.graph.output)


def _initializer_bytes(model: Any) -> int:
    return sum(len(t.raw_data) if t.raw_data else t.ByteSize() for t in model.graph.initializer)


def _save(model: Any, path: Path, threshold: int) -> bool:
    """Save ``model`` to ``path``; external data (``<name>.data``) when over ``threshold``."""
    external = _initializer_bytes(model) > threshold
    if external:
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
            location=path.name + ".data", size_threshold=EXTERNAL_MIN_TENSOR,
        )
    else:
        onnx.save_model(model, str(path))
    return external


PROTOBUF_LIMIT = 2**31 - 1  # bytes one serialized ModelProto can hold


def _simplify(model: Any) -> tuple[Any, str | None]:
    """onnxslim pass; on any failure keep the unsimplified graph and say why."""
    try:
        onnxslim = require("onnxslim", "graph simplification")
        slim = onnxslim.slim(model)
        if slim is None:
            raise RuntimeError("onnxslim returned nothing")
        return slim, None
    except Exception as exc:  # noqa: BLE001 - simplification is an optimization, not a must
        log.warning("onnxslim failed, keeping the unsimplified graph: %s", exc)
        return model, f"{type(exc).__name__}: {exc}"[:500]


def export_onnx(
    model_wrapper: Any,
    spec: ExportSpec,
    out_path: str | Path,
    precision: str = "fp32",
    *,
    force: bool = False,
    simplify: bool = True,
    check: bool = True,
    real_inputs: Any = None,
    trt_batch_range: tuple[int, int, int] | None = None,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    dynamo: bool = False,
    providers: Any = None,
) -> ExportReport:
    """Export ``model_wrapper`` (``spec.wrap(model)``, fp32) to ``out_path`` and validate it.

    Returns the :class:`ExportReport`; ``skipped=True`` when the existing output is current.
    With ``check`` (default) the graph is compared with torch before it is written, and an
    :class:`~o2n_edge.export.validate.ExportValidationError` leaves the previous output as it
    was. ``real_inputs`` (one input tuple or a list of them) are validated too and, for fp16,
    feed the range audit that keeps overflowing layers in fp32. ``providers`` (default CPU)
    runs the validation elsewhere, e.g. CUDA for a faithful fp16 comparison on a GPU box.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    out = Path(out_path).resolve()
    if out.suffix != ".onnx":
        raise ValueError(f"output must end in .onnx: {out}")
    dtypes = {p.dtype for p in model_wrapper.parameters()}
    assert dtypes <= {torch.float32}, (
        f"{spec.name}: export needs fp32 weights (got {dtypes}); fp16 is a graph conversion"
    )
    model_wrapper.eval()
    options = {"simplify": simplify, "check": check, "dynamo": dynamo,
               # fp16: the real inputs drive the range audit, i.e. which layers stay fp32
               "real_inputs": _inputs_digest(real_inputs) if precision == "fp16" else None,
               "external_data_threshold": external_data_threshold,
               "trt_batch_range": list(trt_batch_range or spec.batch_range)}
    t0 = time.perf_counter()
    ihash = input_hash(model_wrapper, spec, precision, options)

    side = _read_sidecar(out)
    if not force and side and side.get("input_hash") == ihash and out.is_file():
        if model_digest(out) == side.get("sha256"):
            log.info("%s: up to date, skipped (%s)", spec.name, out.name)
            report = ExportReport.from_dict(side)
            report.skipped = True
            report.path = str(out)
            return report
        log.info("%s: output changed since export, re-exporting", spec.name)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        report = _export_in(tmp, model_wrapper, spec, out, precision, ihash, simplify, check,
                            real_inputs, trt_batch_range, external_data_threshold, dynamo,
                            providers)
        report.export_s = round(time.perf_counter() - t0, 3)
        _commit(tmp, out, report)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s: exported %s (%s) in %.1fs", spec.name, out.name, precision, report.export_s)
    return report


def _export_in(
    tmp: Path, wrapper: Any, spec: ExportSpec, out: Path, precision: str, ihash: str,
    simplify: bool, check: bool, real_inputs: Any, trt_batch_range: tuple[int, int, int] | None,
    threshold: int, dynamo: bool, providers: Any,
) -> ExportReport:
    """Build and validate the graph inside ``tmp`` (named like the final output)."""
    raw = tmp / "raw" / out.name
    raw.parent.mkdir()
    args = spec.trace_inputs()
    log.info("%s: tracing (opset %d)", spec.name, spec.opset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings on diffusers' shape asserts are expected
        kwargs: dict[str, Any] = dict(
            input_names=list(spec.input_names), output_names=list(spec.output_names),
            opset_version=spec.opset, do_constant_folding=True, dynamo=dynamo,
        )
        if dynamo:
            # one Dim object per symbol: inputs sharing "batch" must share the Dim
            syms: dict[str, Any] = {}
            dims = {
                n: {a: syms.setdefault(s, torch.export.Dim(s, min=1)) for a, s in axes.items()}
                for n, axes in spec.dynamic_axes.items() if n in spec.input_names
            }
            kwargs["dynamic_shapes"] = dims
        else:
            kwargs["dynamic_axes"] = {k: dict(v) for k, v in spec.dynamic_axes.items()}
        from o2n_edge.encoders.clip import mha_fastpath_disabled

        with torch.no_grad(), mha_fastpath_disabled():
            torch.onnx.export(wrapper, args, str(raw), **kwargs)
    model = onnx.load(str(raw))  # pulls in external data if the exporter wrote any
    simplified, simplify_error = False, None
    if simplify and _initializer_bytes(model) > PROTOBUF_LIMIT:
        # onnxslim serializes the whole proto, which fails past 2 GB (an SD-1.5 UNet is 3.4 GB in
        # fp32: seen in the real-size dry run) after minutes and GBs of copies: skip it up front
        simplify_error = f"skipped: {_initializer_bytes(model) / 1e9:.1f} GB of weights > the 2 GB protobuf limit"
        log.info("onnxslim %s", simplify_error)
    elif simplify:
        model, simplify_error = _simplify(model)
        simplified = simplify_error is None
    fp16_info: dict[str, Any] = {}
    if precision == "fp16":
        name_nodes(model)  # the audit and the converter must agree on node names
        src: Any = model
        if _initializer_bytes(model) > threshold:  # > 2 GB: convert from a file
            src = tmp / "fp32" / out.name
            src.parent.mkdir()
            _save(model, src, threshold)
        feeds = [case_feeds(spec, xs) for _, xs in validation_cases(spec, real_inputs)]
        hot, peak = fp16_range_audit(src, feeds)
        model, fp16_info = convert_to_fp16(src, op_block_list=spec.fp16_block_ops, node_block_list=hot)
        fp16_info.update(overflow_nodes=hot, audit_peak=peak)
    final = tmp / out.name
    external = _save(model, final, threshold)
    shutil.rmtree(raw.parent, ignore_errors=True)
    shutil.rmtree(tmp / "fp32", ignore_errors=True)

    errors: dict[str, float] = {}
    if check:
        errors = validate(final, wrapper, spec, precision, real_inputs=real_inputs, providers=providers)
    with torch.no_grad():
        traced_out = wrapper(*args)
    traced_out = traced_out if isinstance(traced_out, (tuple, list)) else (traced_out,)
    traced_shapes = {n: list(x.shape) for n, x in zip(spec.input_names, args)}
    traced_shapes.update({n: list(x.shape) for n, x in zip(spec.output_names, traced_out)})
    inputs, outputs = _io_description(
        onnx.load(str(final), load_external_data=False), spec, traced_shapes
    )
    b = trt_batch_range or spec.batch_range
    files = [out.name] + ([out.name + ".data"] if external else [])
    return ExportReport(
        name=spec.name, path=str(out), precision=precision, input_hash=ihash,
        sha256=model_digest(final), files=files,
        bytes=sum((tmp / f).stat().st_size for f in files), opset=spec.opset,
        external_data=external, simplified=simplified, simplify_error=simplify_error,
        fp16=fp16_info, validation=errors, tolerance=float(spec.tolerance[precision]),
        inputs=inputs, outputs=outputs, trt_profiles=[spec.trt_profile(*b)],
        extra=dict(spec.extra), versions=producing_versions(HASH_VERSIONS),
    )


def _commit(tmp: Path, out: Path, report: ExportReport) -> None:
    """Move the graph (data first) into place, drop a stale data file, write the sidecar last.

    The graph files are complete in ``tmp`` already, so moving them is a rename each; the
    sidecar, written atomically last, is what marks the output current.
    """
    side = sidecar_path(out)
    side.unlink(missing_ok=True)  # from here until the end the old output is not "current"
    data = out.with_name(out.name + ".data")
    if report.external_data:
        os.replace(tmp / data.name, data)
    else:
        data.unlink(missing_ok=True)
    os.replace(tmp / out.name, out)
    atomic_write_text(side, json.dumps(report.to_dict(), indent=2, sort_keys=True))
