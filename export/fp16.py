"""fp16 conversion of an exported ONNX graph that keeps the overflow-prone parts in fp32.

Why graph-level conversion (rather than exporting a half-precision torch model): the torch
model stays fp32 (exportable on CPU, one reference for validation), the fp16 graph keeps fp32
inputs/outputs (``keep_io_types``: the runtime feeds the same arrays whatever the precision),
and the ops that overflow or lose precision in fp16 stay fp32 with casts around them:

- normalizations (LayerNorm, InstanceNorm = GroupNorm at opset 17, GroupNorm) compute
  variances that overflow 65504 on real activations (the "fp16 VAE makes black/NaN images" bug);
- Softmax / Exp / Pow / Sqrt / ReduceMean feed those norms or attention;
- the sinusoidal timestep embedding: ``t * freq`` for t ~ 999 has an fp16 spacing of 0.5, i.e.
  the UNet would see the wrong timestep; every node upstream of a Sin/Cos is kept fp32.

- every node that produces or consumes a tensor whose magnitude, measured on the *fp32* graph
  with real and random inputs (:func:`fp16_range_audit`), comes within ``headroom`` of fp16's
  65504: the layers that overflow stay fp32, the rest gets the speed.

Why the range audit instead of trusting an fp16 run on CPU: onnxruntime's CPU provider has no
fp16 kernel for many ops and silently inserts casts to run them in fp32, so an fp16 graph that
overflows on a GPU can look perfect on CPU (measured: a Mul reaching 8e6 returned finite values).
The result is still validated against fp32 torch (``validate.py``; on a GPU pass CUDA providers
for a faithful fp16 run), and any non-finite output is an error, not a warning. Torch-free
(onnx + onnxruntime only).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from o2n_edge._lazy import require

onnx = require("onnx", "fp16 conversion")

log = logging.getLogger(__name__)

FP16_BLOCK_COMMON: tuple[str, ...] = (
    "LayerNormalization", "InstanceNormalization", "GroupNormalization",
    "ReduceMean", "Pow", "Sqrt", "Exp", "Softmax",
)
# The VAE is the classic fp16 overflow. Its GroupNorms are covered by the common list; its
# convolutions stay fp16 for speed, and real inputs decide (validate.py).
FP16_BLOCK_VAE: tuple[str, ...] = FP16_BLOCK_COMMON
SINUSOID_OPS = ("Sin", "Cos")
FP16_MAX = 65504.0
AUDIT_HEADROOM = 4.0  # tensors above FP16_MAX / 4 on the audit inputs are kept fp32
MAX_SINUSOID_PATH = 64  # more upstream nodes than this means Sin/Cos on activations: stop


class FP16ConversionError(RuntimeError):
    """The fp16 graph could not be produced, or produced non-finite values."""


def name_nodes(model: Any) -> None:
    """Give unnamed nodes unique, deterministic names (node block lists match by name)."""
    seen = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_fp16auto_{i}"
            while name in seen:
                name += "_"
            node.name = name
            seen.add(name)


def sinusoid_path_nodes(model: Any, ops: Sequence[str] = SINUSOID_OPS) -> list[str]:
    """Names of Sin/Cos nodes and every node upstream of them (back to graph inputs).

    That subgraph is the timestep embedding: scalars times frequencies, where fp16 rounding
    of the product changes the angle by up to 0.25 rad.
    """
    producer = {out: node for node in model.graph.node for out in node.output}
    roots = [n for n in model.graph.node if n.op_type in ops]
    blocked: list[str] = []
    for root in roots:
        path, stack, seen = [root.name], list(root.input), set()
        while stack and len(path) <= MAX_SINUSOID_PATH:
            tensor = stack.pop()
            node = producer.get(tensor)
            if node is None or node.name in seen:
                continue
            seen.add(node.name)
            path.append(node.name)
            stack.extend(node.input)
        if len(path) > MAX_SINUSOID_PATH:
            log.warning("Sin/Cos %s has a long upstream path; keeping only it in fp32", root.name)
            path = [root.name]
        blocked.extend(path)
    return sorted(set(blocked))


def convert_to_fp16(
    model: Any,
    op_block_list: Iterable[str] = FP16_BLOCK_COMMON,
    node_block_list: Iterable[str] = (),
    keep_sinusoids_fp32: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """fp16 copy of ``model`` (a ModelProto, or a path for graphs > 2 GB) + a small report.

    Inputs/outputs stay fp32. Returns ``(model16, info)`` with the blocked op types and how
    many nodes were kept in fp32.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    on_disk = isinstance(model, (str, Path))
    if on_disk:
        # Graph structure only (weights stay on disk); the converter re-reads the file with
        # infer_shapes_path, which works beyond protobuf's 2 GB limit.
        proto = onnx.load(str(model), load_external_data=False)
        unnamed = sum(1 for n in proto.graph.node if not n.name)
        if unnamed:
            log.warning("%d unnamed nodes in %s cannot be kept fp32 by name", unnamed, model)
    else:
        proto = model
        name_nodes(proto)
    nodes = set(node_block_list)
    if keep_sinusoids_fp32:
        nodes |= {n for n in sinusoid_path_nodes(proto) if n}
    ops = sorted(set(op_block_list))
    original = {n.name for n in proto.graph.node}
    try:
        out = convert_float_to_float16(
            str(model) if on_disk else proto,
            keep_io_types=True, op_block_list=ops, node_block_list=sorted(nodes),
        )
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise FP16ConversionError(f"fp16 conversion failed: {exc}") from exc
    collapsed = collapse_cast_roundtrips(out, original)
    kept = sum(1 for n in out.graph.node if n.op_type in ops or n.name in nodes)
    info = {"op_block_list": ops, "blocked_nodes": len(nodes), "fp32_nodes": kept,
            "nodes": len(out.graph.node), "collapsed_casts": collapsed}
    log.info("fp16: %d of %d nodes kept fp32", kept, len(out.graph.node))
    return out, info


def collapse_cast_roundtrips(model: Any, original_names: set[str]) -> int:
    """Remove the converter's lossy fp32 -> fp16 -> fp32 round trips between fp32 nodes.

    ``convert_float_to_float16`` casts every blocked node's output to fp16 and casts it back
    for a blocked consumer, so a value kept fp32 *because* it exceeds 65504 still passes
    through fp16 (Inf) between two fp32 layers. A converter-inserted ``Cast(to=fp16)`` always
    reads an fp32 tensor, so a ``Cast(to=fp32)`` of its output can read that tensor directly.
    Returns how many round trips were removed.
    """
    fp16_t, fp32_t = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT

    def cast_to(node: Any) -> int | None:
        if node.op_type != "Cast":
            return None
        return next((a.i for a in node.attribute if a.name == "to"), None)

    producer = {out: n for n in model.graph.node for out in n.output}
    collapsed = 0
    for node in model.graph.node:
        if cast_to(node) != fp32_t or not node.input:
            continue
        src = producer.get(node.input[0])
        if src is not None and src.name not in original_names and cast_to(src) == fp16_t:
            node.input[0] = src.input[0]
            collapsed += 1
    # drop converter casts that nothing reads any more
    while True:
        used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        dead = [n for n in model.graph.node
                if n.name not in original_names and n.op_type == "Cast" and not (set(n.output) & used)]
        if not dead:
            break
        for n in dead:
            model.graph.node.remove(n)
    return collapsed


def fp16_range_audit(
    model: Any,
    feeds: Iterable[Mapping[str, np.ndarray]],
    headroom: float = AUDIT_HEADROOM,
    work_dir: str | Path | None = None,
) -> tuple[list[str], float]:
    """Run the fp32 graph exposing every float tensor; return the nodes that must stay fp32.

    ``model`` is a fp32 ModelProto, or a path (graphs with external data: the audit copy is
    written next to it, in ``work_dir`` which must be the graph's directory). A node is
    returned when any float tensor it reads or writes exceeds ``FP16_MAX / headroom`` on any
    of ``feeds``. Also returns the largest magnitude seen (for the export report).
    """
    import onnxruntime as ort
    from onnx import shape_inference

    on_disk = isinstance(model, (str, Path))
    proto = onnx.load(str(model), load_external_data=False) if on_disk else onnx.ModelProto()
    if not on_disk:
        proto.CopyFrom(model)
    name_nodes(proto)
    try:
        inferred = shape_inference.infer_shapes(proto)  # types of intermediate tensors
    except Exception:  # noqa: BLE001 - very large graphs: fall back to declared types only
        inferred = proto
    float_t = onnx.TensorProto.FLOAT
    typed = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    existing = {o.name for o in proto.graph.output}
    graph_inputs = {i.name for i in proto.graph.input if i.type.tensor_type.elem_type == float_t}
    probe = []
    for node in proto.graph.node:
        for out in node.output:
            v = typed.get(out)
            if out and v is not None and v.type.tensor_type.elem_type == float_t and out not in existing:
                probe.append(v)
    del proto.graph.value_info[:]
    proto.graph.output.extend(probe)
    names = [o.name for o in proto.graph.output]

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
    opts.log_severity_level = 3
    if on_disk:
        audit_path = Path(work_dir or Path(model).parent) / f".audit-{Path(model).name}"
        onnx.save(proto, str(audit_path))
        sess = ort.InferenceSession(str(audit_path), opts, providers=["CPUExecutionProvider"])
    else:
        audit_path = None
        sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    peak: dict[str, float] = {}
    try:
        for feed in feeds:
            for name in graph_inputs & set(feed):
                peak[name] = max(peak.get(name, 0.0), float(np.abs(feed[name]).max(initial=0.0)))
            for name, arr in zip(names, sess.run(names, dict(feed))):
                if arr.size and np.issubdtype(arr.dtype, np.floating):
                    finite = np.abs(arr[np.isfinite(arr)])
                    val = float(finite.max(initial=0.0)) if finite.size == arr.size else float("inf")
                    peak[name] = max(peak.get(name, 0.0), val)
    finally:
        del sess
        if audit_path is not None:
            audit_path.unlink(missing_ok=True)
    limit = FP16_MAX / headroom
    hot = {t for t, v in peak.items() if v > limit}
    nodes = sorted(n.name for n in proto.graph.node if hot & (set(n.input) | set(n.output)))
    if nodes:
        log.info("fp16 audit: %d nodes touch tensors above %.0f, kept fp32", len(nodes), limit)
    return nodes, max(peak.values(), default=0.0)


def nonfinite_outputs(outputs: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Output name -> count of NaN/Inf values (only outputs that have any)."""
    bad = {}
    for name, arr in outputs.items():
        arr = np.asarray(arr)
        if np.issubdtype(arr.dtype, np.floating):
            n = int(arr.size - np.isfinite(arr).sum())
            if n:
                bad[name] = n
    return bad


def check_finite(outputs: Mapping[str, np.ndarray], context: str = "") -> None:
    """Raise :class:`FP16ConversionError` when any output holds NaN/Inf (fp16 overflow)."""
    bad = nonfinite_outputs(outputs)
    if bad:
        where = f" ({context})" if context else ""
        raise FP16ConversionError(
            f"non-finite outputs{where}: {bad}; an fp16 layer overflows - add its op type to "
            "the spec's fp16_block_ops or export this model in fp32"
        )
