"""Write a Triton Inference Server model repository from a verified bundle.

Layout (``<n>`` = ``--name``, default ``o2n``)::

    <out>/
      <n>_inspect/        Python backend, self-contained: the whole runtime pipeline in one model
        config.pbtxt      (IMAGE bytes | IMAGE_RAW uint8 HxWx3 -> SCORE, DECISION, THRESHOLD, ANOMALY_MAP)
        1/model.py  1/bundle/...
      <n>_pipeline/       Python backend, BLS: scheduler, bank search and scoring here, graphs below
        config.pbtxt  1/model.py  1/bundle/...
      <n>_image_encoder/  onnxruntime (1/model.onnx), tensorrt_plan (1/model.plan) or python
      <n>_vae_encoder/  <n>_unet/  <n>_vae_decoder/     (bundles with the personalized branch)

Why this shape: Triton schedules, batches and places each graph model itself (instance groups,
dynamic batching, TensorRT plans as first-class models), while the numpy parts of the method stay
in one place, the runtime pipeline, which both Python models call through its public API. Every
``config.pbtxt`` carries the bundle hash as a parameter, so a served decision names its bundle.

Bundle files are hard-linked into the repository when it is on the same file system (no copy of
multi-GB graphs), copied otherwise. The repository is written next to ``out`` and renamed into
place: a crash never leaves half a repository that Triton would try to load.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from o2n_edge.atomic import AtomicDir
from o2n_edge.runtime.bundle import ENGINES_DIR, MANIFEST_NAME, Bundle, load_bundle
from o2n_edge.runtime.manifest import ModelEntry, TensorSpec, need
from o2n_edge.triton import config as cfg
from o2n_edge.triton.python_models import (
    BUNDLE_DIR,
    IMAGE_BYTES,
    IMAGE_RAW,
    MODEL_PY,
    OUT_DECISION,
    OUT_MAP,
    OUT_SCORE,
    OUT_THRESHOLD,
    PARAM_BACKEND,
    PARAM_BUNDLE_HASH,
    PARAM_GRAPH_FILE,
    PARAM_GRAPH_MODELS,
    PARAM_THREADS,
)

log = logging.getLogger("o2n_edge.triton")

VERSION = "1"
GRAPH_BACKENDS = ("onnxruntime", "python")
DEVICES = ("cpu", "gpu")
# Requests wait up to this long for batch partners: ~a few percent of one lite inspection.
QUEUE_DELAY_US = 5000
# Max batch when the bundle's export specs give no TensorRT profile (the runtime's default batch).
FALLBACK_MAX_BATCH = 8
BATCH_SYMBOL = "batch"
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


@dataclass
class RepositoryOptions:
    """What ``o2n-edge triton`` asks for; defaults serve a CPU box."""

    name: str = "o2n"
    max_batch: int | None = None  # None: the bundle's TensorRT profile max (export specs)
    queue_delay_us: int = QUEUE_DELAY_US
    instances: int = 1
    device: str = "cpu"  # cpu | gpu: instance kind of every model
    graph_backend: str = "onnxruntime"  # how graph models run: onnxruntime backend | python (ORT)
    engines: bool = True  # use the bundle's TensorRT plans that are valid on this machine
    threads: int = 0  # onnxruntime intra-op threads inside the Python models (0 = default)
    force: bool = False


@dataclass
class RepositorySummary:
    """What was written (the CLI prints it; tests read it)."""

    path: Path
    bundle_hash: str
    models: dict[str, str] = field(default_factory=dict)  # model name -> backend/platform
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)  # model name -> config (as rendered)
    max_batch: int = 0
    checked: bool = False  # every config parsed by Triton's ModelConfig protobuf
    linked: bool = True  # bundle files hard-linked (False: copied)


def _dims(shape: list[Any], batched: bool) -> list[int]:
    dims = [d if isinstance(d, int) else -1 for d in (shape[1:] if batched else shape)]
    return dims


def _tensor(name: str, spec: TensorSpec, batched: bool) -> dict[str, Any]:
    dtype = spec.dtype
    if dtype not in cfg.TRITON_DTYPES:
        raise ValueError(f"tensor {name!r}: dtype {dtype!r} has no Triton type")
    out: dict[str, Any] = {"name": name, "data_type": cfg.TRITON_DTYPES[dtype]}
    dims = _dims(list(spec.shape or []), batched)
    if not dims:  # a per-sample scalar (e.g. the UNet's timestep): Triton needs dims [1]
        out["dims"] = [1]
        out["reshape"] = {"shape": []}
    else:
        out["dims"] = dims
    return out


def _batched(entry: ModelEntry) -> bool:
    """Whether every tensor's first axis is the symbolic batch axis (so Triton may batch)."""
    tensors = list((entry.inputs or {}).values()) + list((entry.outputs or {}).values())
    return all(t.shape and t.shape[0] == BATCH_SYMBOL for t in tensors)


def _profile_max_batch(entry: ModelEntry) -> int | None:
    """The largest batch the graph's TensorRT profiles (from its export spec) allow."""
    best = None
    for profile in entry.trt_profiles or []:
        for shapes in profile.values():
            mx = shapes.get("max")
            if mx:
                best = max(best or 0, int(mx[0]))
    return best


def _instance_group(opts: RepositoryOptions, gpu_only: bool = False) -> list[dict[str, Any]]:
    """Instances of one model: ``--device``'s kind, except a TensorRT plan, which only runs on a GPU.

    Why: Triton's TensorRT backend refuses a ``KIND_CPU`` instance group ("supports only GPU
    device"), and a plan is only used when it was built for this machine's GPU.
    """
    gpu = gpu_only or opts.device == "gpu"
    return [{"count": opts.instances, "kind": "KIND_GPU" if gpu else "KIND_CPU"}]


def _dynamic_batching(max_batch: int, opts: RepositoryOptions) -> dict[str, Any]:
    return {"preferred_batch_size": [max_batch], "max_queue_delay_microseconds": opts.queue_delay_us}


def _link_or_copy(src: Path, dst: Path) -> bool:
    """Hard link (same file system), else copy; True when linked."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
        return True
    except OSError:
        shutil.copy2(src, dst)
        return False


def _place_bundle(bundle: Bundle, dst: Path) -> bool:
    """The bundle's manifest, listed files and engines under ``dst``; True when all linked."""
    linked = True
    names = [MANIFEST_NAME, *bundle.manifest_data.files]
    for name in names:
        linked &= _link_or_copy(bundle.path / name, dst / name)
    engines = bundle.engines_dir
    if engines.is_dir():
        for p in sorted(engines.rglob("*")):
            if p.is_file():
                linked &= _link_or_copy(p, dst / ENGINES_DIR / p.relative_to(engines))
    return linked


def _plan_for(bundle: Bundle, graph: str) -> tuple[Path, int | None] | None:
    """A TensorRT plan of ``graph`` valid on this machine (key checked) and its max batch."""
    from o2n_edge.runtime.engine_cache import find_plans

    if not bundle.engines_dir.is_dir():
        return None
    plans = find_plans(bundle.engines_dir, graph, bundle.model_path(graph))
    if not plans:
        return None
    plan, key = plans[0]
    maxes = [int(s["max"][0]) for prof in key.profiles for s in prof.values() if s.get("max")]
    return plan, (min(maxes) if maxes else None)


class _Writer:
    def __init__(self, bundle: Bundle, root: Path, opts: RepositoryOptions) -> None:
        self.bundle, self.root, self.opts = bundle, root, opts
        self.manifest = bundle.manifest_data
        self.bundle_hash = str(self.manifest.manifest_sha256)
        self.summary = RepositorySummary(path=root, bundle_hash=self.bundle_hash)
        self.texts: dict[str, str] = {}

    def model_name(self, part: str) -> str:
        return f"{self.opts.name}_{part}"

    def common_parameters(self, extra: dict[str, str] | None = None) -> list[dict[str, Any]]:
        values = {
            PARAM_BUNDLE_HASH: self.bundle_hash,
            "category": str(self.manifest.category or ""),
            "profile": str(self.manifest.profile or ""),
            **(extra or {}),
        }
        return cfg.parameters(values)

    def write_config(self, model: str, config: dict[str, Any], backend: str) -> None:
        text = cfg.render(config)
        (self.root / model).mkdir(parents=True, exist_ok=True)
        (self.root / model / "config.pbtxt").write_text(text, encoding="utf-8")
        self.texts[model] = text
        self.summary.models[model] = backend
        self.summary.configs[model] = config

    def graph(self, graph: str, max_batch: int) -> None:
        entry = need(self.manifest.models, "models")[graph]
        model = self.model_name(graph)
        version = self.root / model / VERSION
        batched = _batched(entry)
        plan = _plan_for(self.bundle, graph) if self.opts.engines else None
        config: dict[str, Any] = {"name": model}
        if plan is not None:
            path, plan_max = plan
            if plan_max is not None and max_batch > plan_max:
                raise ValueError(f"{graph}: the TensorRT plan allows batch <= {plan_max}, "
                                 f"not {max_batch} (pass --max-batch {plan_max} or --no-engines)")
            config["platform"] = "tensorrt_plan"
            self.summary.linked &= _link_or_copy(path, version / "model.plan")
            kind = "tensorrt_plan"
        elif self.opts.graph_backend == "onnxruntime":
            config["backend"] = "onnxruntime"
            src = self.bundle.model_path(graph)
            self.summary.linked &= _link_or_copy(src, version / "model.onnx")
            data = src.with_name(src.name + ".data")  # external weights keep the name the graph holds
            if data.is_file():
                self.summary.linked &= _link_or_copy(data, version / data.name)
            kind = "onnxruntime"
        else:
            config["backend"] = "python"
            src = self.bundle.model_path(graph)
            self.summary.linked &= _link_or_copy(src, version / src.name)
            data = src.with_name(src.name + ".data")
            if data.is_file():
                self.summary.linked &= _link_or_copy(data, version / data.name)
            (version / "model.py").write_text(MODEL_PY.format(cls="GraphModel"), encoding="utf-8")
            kind = "python"
        config["max_batch_size"] = max_batch if batched else 0
        config["input"] = [_tensor(n, s, batched) for n, s in need(entry.inputs, f"models.{graph}.inputs").items()]
        config["output"] = [_tensor(n, s, batched) for n, s in need(entry.outputs, f"models.{graph}.outputs").items()]
        if batched:
            config["dynamic_batching"] = _dynamic_batching(max_batch, self.opts)
        config["instance_group"] = _instance_group(self.opts, gpu_only=kind == "tensorrt_plan")
        extra = {PARAM_GRAPH_FILE: self.bundle.model_path(graph).name} if kind == "python" else {}
        if kind == "python":
            extra[PARAM_BACKEND] = "cuda" if self.opts.device == "gpu" else "cpu"
            extra[PARAM_THREADS] = str(self.opts.threads)
        config["parameters"] = self.common_parameters(extra)
        self.write_config(model, config, kind)

    def inspect_model(self, part: str, cls: str, max_batch: int, extra: dict[str, str]) -> None:
        model = self.model_name(part)
        version = self.root / model / VERSION
        self.summary.linked &= _place_bundle(self.bundle, version / BUNDLE_DIR)
        (version / "model.py").write_text(MODEL_PY.format(cls=cls), encoding="utf-8")
        size = int(need(self.manifest.image_size, "image_size"))
        config = {
            "name": model,
            "backend": "python",
            "max_batch_size": max_batch,
            "input": [
                {"name": IMAGE_BYTES, "data_type": "TYPE_STRING", "dims": [1], "optional": True},
                {"name": IMAGE_RAW, "data_type": "TYPE_UINT8", "dims": [-1, -1, 3], "optional": True},
            ],
            "output": [
                {"name": OUT_SCORE, "data_type": "TYPE_FP32", "dims": [1]},
                {"name": OUT_DECISION, "data_type": "TYPE_BOOL", "dims": [1]},
                {"name": OUT_THRESHOLD, "data_type": "TYPE_FP32", "dims": [1]},
                {"name": OUT_MAP, "data_type": "TYPE_FP32", "dims": [size, size]},
            ],
            "dynamic_batching": _dynamic_batching(max_batch, self.opts),
            "instance_group": _instance_group(self.opts),
            "parameters": self.common_parameters({
                PARAM_BACKEND: "cuda" if self.opts.device == "gpu" else "cpu",
                PARAM_THREADS: str(self.opts.threads),
                "threshold": repr(float(need(self.manifest.threshold, "threshold").value)),
                "image_size": str(size),
                **extra,
            }),
        }
        self.write_config(model, config, "python")

    def write(self) -> RepositorySummary:
        described = self.manifest.models or {}
        graphs = list(described)
        limits = [m for g in graphs if (m := _profile_max_batch(described[g]))]
        max_batch = self.opts.max_batch or (min(limits) if limits else FALLBACK_MAX_BATCH)
        self.summary.max_batch = max_batch
        self.inspect_model("inspect", "InspectModel", max_batch, {})
        if graphs:
            for graph in graphs:
                self.graph(graph, max_batch)
            mapping = json.dumps({g: self.model_name(g) for g in graphs}, sort_keys=True)
            self.inspect_model("pipeline", "PipelineModel", max_batch, {PARAM_GRAPH_MODELS: mapping})
        checked = [cfg.try_check_config(t, f"{m}/config.pbtxt") for m, t in self.texts.items()]
        self.summary.checked = all(checked)
        return self.summary


def write_repository(bundle_path: str | Path, out: str | Path, opts: RepositoryOptions | None = None) -> RepositorySummary:
    """Verify the bundle, write the repository beside ``out``, then rename it into place."""
    opts = opts or RepositoryOptions()
    if not NAME_RE.match(opts.name):
        raise ValueError(f"--name {opts.name!r}: use letters, digits, '_', '.', '-' (at most 64)")
    if opts.graph_backend not in GRAPH_BACKENDS:
        raise ValueError(f"--graph-backend must be one of {', '.join(GRAPH_BACKENDS)}")
    if opts.device not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}")
    if opts.instances < 1 or (opts.max_batch is not None and opts.max_batch < 1) or opts.queue_delay_us < 0:
        raise ValueError("--instances and --max-batch must be >= 1, --queue-delay-us >= 0")
    bundle = load_bundle(bundle_path)
    out = Path(out).resolve()
    if out.exists() and not opts.force:
        raise FileExistsError(f"{out} exists (pass --force to replace it)")
    with AtomicDir(out) as tmp:  # an existing repository is swapped out only once this one is complete
        summary = _Writer(bundle, tmp, opts).write()
    summary.path = out
    return summary
