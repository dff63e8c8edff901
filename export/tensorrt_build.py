"""Build TensorRT engines for a bundle's ONNX graphs, on the target device, with a cache.

Why on the target: a TensorRT plan is specific to the GPU, the TensorRT version and (on Jetson)
the JetPack release; it cannot be built on the workstation and shipped. So the bundle carries
ONNX graphs plus each model's optimization profiles (``models[name]["trt_profiles"]``), and this
module builds ``<bundle>/engines/<name>-<key16>.plan`` next to a sidecar JSON holding the
:class:`~o2n_edge.runtime.engine_cache.EngineKey` (onnx sha256, precision flags, every profile's
min/opt/max, TensorRT version, GPU name + compute capability, JetPack). A plan whose key matches
is reused; a timing cache file makes rebuilds (new profile, new bundle) much faster. The timing
cache is only valid for one TensorRT version on one GPU architecture, so its file name carries
both (:func:`timing_cache_path`), and a cache TensorRT refuses is replaced by a fresh one.

This module does not import torch (it runs where only ``o2n-edge[trt]`` is installed) and
imports ``tensorrt`` lazily: without it, or without an NVIDIA GPU, :class:`TensorRTUnavailable`
says what to install and where to run. Written against the TensorRT 10 Python API.

Alternative without our own builder: onnxruntime's TensorRT execution provider with its own
engine cache, configured by :func:`ort_tensorrt_provider_options`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from o2n_edge.atomic import atomic_write_bytes
from o2n_edge.runtime.bundle import ENGINES_DIR, load_bundle
from o2n_edge.runtime.manifest import ModelEntry
from o2n_edge.runtime.providers import ort_tensorrt_provider_options  # noqa: F401 - re-exported here
from o2n_edge.runtime.engine_cache import (
    EngineKey,
    check_plan,
    engine_key,
    gpu_info,
    jetpack_version,
    model_digest,
    normalize_profiles,
    plan_path,
    write_plan,
)

log = logging.getLogger(__name__)

DEFAULT_WORKSPACE_GB = 4.0
PRECISION_FLAGS = {"fp32": (), "fp16": ("fp16",)}
INSTALL_HINT = (
    "pip install 'o2n-edge[trt]' (TensorRT >= 10) on the target machine with an NVIDIA GPU "
    "and driver (on Jetson, TensorRT comes with JetPack: use its python3-libnvinfer). "
    "Without TensorRT, run the bundle with onnxruntime (CPU or CUDA EP) instead."
)


@dataclass(frozen=True)
class BuildRecipe:
    """How to build one engine with this TensorRT: network flags, builder flags, norm constraints."""

    trt_major: int
    strongly_typed: bool
    network_flags: int
    builder_flags: tuple[str, ...]  # names in trt.BuilderFlag
    constrain_norms: bool  # 10.x weak typing only: pin normalization layers to fp32


def trt_major(trt: Any) -> int:
    """Major version of a ``tensorrt`` module (or a stand-in with ``__version__``)."""
    return int(str(trt.__version__).split(".")[0])


def build_recipe(trt: Any, precision: str, graph_precision: str, norms_fp32: bool = True) -> BuildRecipe:
    """Choose the build path for ``precision`` engines from ``graph_precision`` graphs on this TensorRT.

    Pure function of the module's version and attributes, so the switch is unit-tested with a
    stand-in module where no GPU is at hand.
    """
    if precision not in PRECISION_FLAGS:
        raise ValueError(f"precision must be one of {sorted(PRECISION_FLAGS)}, got {precision!r}")
    major = trt_major(trt)
    creation = getattr(trt, "NetworkDefinitionCreationFlag", None)
    strong_bit = getattr(creation, "STRONGLY_TYPED", None) if creation is not None else None
    strong_flags = (1 << int(strong_bit)) if strong_bit is not None else 0
    if major >= 11:
        if precision != graph_precision:
            raise EngineBuildError(
                f"TensorRT {trt.__version__} builds strongly typed networks only: engine precision comes "
                f"from the graph, and this bundle's graphs are {graph_precision}. For {precision} engines "
                f"export the bundle with `o2n-edge export ... --precision {precision}` (or build with "
                f"--precision {graph_precision})")
        # the flag is accepted and ignored on 11.x (strong typing is unconditional): harmless to set
        return BuildRecipe(major, True, strong_flags, (), False)
    if graph_precision == "fp16":
        if precision != "fp16":
            raise EngineBuildError("this bundle's graphs are fp16: build fp16 engines (or export an fp32 bundle)")
        if strong_bit is None:
            # pre-10.x-strong-typing builds: weak typing with the FP16 flag still honours fp16 graphs
            return BuildRecipe(major, False, 0, ("FP16",), False)
        return BuildRecipe(major, True, strong_flags, (), False)
    if precision == "fp16":  # fp32 graphs, fp16 kernels: TensorRT 10 weak typing (today's path)
        return BuildRecipe(major, False, 0, ("FP16",), norms_fp32)
    return BuildRecipe(major, False, 0, (), False)


class TensorRTUnavailable(RuntimeError):
    """TensorRT or an NVIDIA GPU is missing here; the message says what to install/where to run."""


class EngineBuildError(RuntimeError):
    """TensorRT could not parse or build a graph (parser errors are in the message)."""


@dataclass
class EngineReport:
    """Result of one model's engine build (or cache hit)."""

    name: str
    plan: str
    key_digest: str
    cached: bool
    build_s: float = 0.0
    plan_bytes: int = 0
    rebuild_reason: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for benchmark/export logs)."""
        return asdict(self)


def _import_tensorrt() -> Any:
    """``tensorrt`` module, or :class:`TensorRTUnavailable` with an install hint."""
    try:
        import tensorrt as trt  # noqa: PLC0415 - lazy on purpose
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken CUDA lib load
        raise TensorRTUnavailable(f"TensorRT is not importable ({exc}). {INSTALL_HINT}") from exc
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} found, need >= 10. {INSTALL_HINT}")
    return trt


def check_tensorrt(device: int = 0) -> tuple[Any, tuple[str, str]]:
    """``(tensorrt module, (gpu name, compute capability))`` or :class:`TensorRTUnavailable`."""
    trt = _import_tensorrt()
    gpu = gpu_info(device)
    if gpu is None:
        raise TensorRTUnavailable(
            f"no NVIDIA GPU (device {device}) visible: TensorRT engines must be built on the "
            f"target GPU. {INSTALL_HINT}"
        )
    return trt, gpu


def profiles_for(
    entry: ModelEntry,
    batch_range: tuple[int, int, int] | None = None,
) -> tuple[dict[str, dict[str, list[int]]], ...]:
    """Optimization profiles of a manifest model entry, optionally with a new batch range.

    A new ``(min, opt, max)`` batch replaces axis 0 of every input (the batch axis: only axis
    0 is dynamic in our graphs); other dims keep the exported resolution.
    """
    profiles = entry.trt_profiles or []
    if not profiles:
        raise ValueError("model entry has no trt_profiles; re-export the bundle")
    if batch_range is not None:
        mn, opt, mx = batch_range
        profiles = [
            {n: {"min": [mn, *s["min"][1:]], "opt": [opt, *s["opt"][1:]], "max": [mx, *s["max"][1:]]}
             for n, s in prof.items()}
            for prof in profiles
        ]
    return normalize_profiles(profiles)


def timing_cache_path(cache_dir: str | Path, trt_version: str, compute_capability: str) -> Path:
    """``<cache_dir>/timing-trt<version>-sm<cc>.cache``: one timing cache per TensorRT version and GPU arch.

    Why: timing entries measured on one GPU or TensorRT version are wrong (or refused) on another;
    one shared file would be rejected, or worse mislead tactic choice, whenever the bundle moves.
    """
    cc = str(compute_capability).replace(".", "")
    return Path(cache_dir) / f"timing-trt{trt_version}-sm{cc}.cache"


def _attach_timing_cache(config: Any, timing_cache: Path) -> Any:
    """Load ``timing_cache`` into ``config``; a cache TensorRT refuses is replaced by an empty one.

    ``set_timing_cache`` returns False when the file was written for another device or TensorRT
    (``ignore_mismatch=False``); ignoring that would build without the cache and then overwrite a
    cache that is valid elsewhere with nothing learned.
    """
    blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(blob)
    if config.set_timing_cache(cache, ignore_mismatch=False):
        return cache
    log.warning("TensorRT refused the timing cache %s (another GPU or TensorRT version): starting a new one",
                timing_cache)
    cache = config.create_timing_cache(b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("TensorRT refused an empty timing cache: building without one")
        return None
    return cache


def build_engine(
    onnx_path: str | Path,
    plan: str | Path,
    key: EngineKey,
    *,
    graph_precision: str = "fp32",
    workspace_gb: float = DEFAULT_WORKSPACE_GB,
    timing_cache: str | Path | None = None,
    norms_fp32: bool = True,
    verbose: bool = False,
) -> float:
    """Parse ``onnx_path``, build a plan for ``key``'s precision/profiles, write plan + sidecar.

    Returns the build time in seconds. The path (strongly typed, or 10.x weak typing with
    normalization layers pinned to fp32: variance overflow) comes from :func:`build_recipe`.
    """
    trt = _import_tensorrt()
    precision = "fp16" if "fp16" in key.precision else "fp32"
    recipe = build_recipe(trt, precision, graph_precision, norms_fp32)
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(recipe.network_flags)  # explicit batch is the only mode since 10
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external data (<name>.onnx.data) relative to the graph.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT cannot parse {onnx_path}:\n  " + "\n  ".join(errors))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    for flag in recipe.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if recipe.constrain_norms:
        constrained = 0
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type == trt.LayerType.NORMALIZATION:
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
                constrained += 1
        if constrained:
            config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)

    graph_inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    for prof in key.profiles:
        missing = set(graph_inputs) - set(prof)
        if missing:
            raise EngineBuildError(f"profile lacks graph inputs {sorted(missing)}")
        p = builder.create_optimization_profile()
        for name, shapes in prof.items():
            if name not in graph_inputs:
                raise EngineBuildError(f"profile names {name!r}, not a graph input of {onnx_path}")
            p.set_shape(name, tuple(shapes["min"]), tuple(shapes["opt"]), tuple(shapes["max"]))
        config.add_optimization_profile(p)

    cache = _attach_timing_cache(config, Path(timing_cache)) if timing_cache is not None else None

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - t0
    if serialized is None:
        raise EngineBuildError(f"TensorRT failed to build {onnx_path} (see the TensorRT log above)")
    write_plan(plan, memoryview(serialized).tobytes(), key,
               extra={"onnx": Path(onnx_path).name, "build_s": round(build_s, 2),
                      "strongly_typed": recipe.strongly_typed, "graph_precision": graph_precision,
                      "workspace_gb": workspace_gb, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    if timing_cache is not None and cache is not None:
        atomic_write_bytes(Path(timing_cache), memoryview(config.get_timing_cache().serialize()).tobytes())
    return build_s


def build_engines(
    bundle_dir: str | Path,
    precision: str | None = None,
    models: Sequence[str] | None = None,
    *,
    batch_range: tuple[int, int, int] | None = None,
    cache_dir: str | Path | None = None,
    timing_cache: str | Path | None = None,
    workspace_gb: float = DEFAULT_WORKSPACE_GB,
    device: int = 0,
    force: bool = False,
) -> dict[str, EngineReport]:
    """Build (or reuse) one plan per model of a verified bundle; returns a report per model.

    ``precision`` defaults to the bundle's own (the manifest's ``precision``): on TensorRT 11 the
    engine cannot differ from the graph. ``cache_dir`` defaults to ``<bundle>/engines`` (ignored by bundle verification),
    ``timing_cache`` to :func:`timing_cache_path` (keyed by TensorRT version and compute
    capability); ``batch_range`` overrides the exported
    profiles' batch axis; ``force`` rebuilds even when a matching plan exists.
    """
    bundle = load_bundle(bundle_dir)  # refuses a bundle whose hashes do not match
    graph_precision = bundle.manifest_data.precision or "fp32"
    precision = precision or graph_precision
    if precision not in PRECISION_FLAGS:
        raise ValueError(f"precision must be one of {sorted(PRECISION_FLAGS)}, got {precision!r}")
    trt, (gpu_name, cc) = check_tensorrt(device)
    build_recipe(trt, precision, graph_precision)  # refuse early (TensorRT 11 + mismatched precision)
    cache = Path(cache_dir) if cache_dir is not None else bundle.path / ENGINES_DIR
    cache.mkdir(parents=True, exist_ok=True)
    tcache = Path(timing_cache) if timing_cache is not None else timing_cache_path(cache, trt.__version__, cc)
    described = bundle.manifest_data.models or {}
    names = list(models) if models is not None else sorted(described)
    jetpack = jetpack_version()
    reports: dict[str, EngineReport] = {}
    for i, name in enumerate(names, 1):
        if name not in described:
            raise KeyError(f"bundle has no model {name!r} (has {sorted(described)})")
        entry = described[name]
        onnx_path = bundle.model_path(name)
        key = engine_key(
            model_digest(onnx_path), PRECISION_FLAGS[precision], profiles_for(entry, batch_range),
            trt.__version__, gpu_name, cc, jetpack=jetpack,
        )
        plan = plan_path(cache, name, key)
        problems = check_plan(plan, key)
        if not problems and not force:
            log.info("[%d/%d] %s: cached engine %s", i, len(names), name, plan.name)
            reports[name] = EngineReport(name, str(plan), key.digest(), True,
                                         plan_bytes=plan.stat().st_size)
            continue
        log.info("[%d/%d] %s: building %s engine (%s)", i, len(names), name, precision,
                 "; ".join(problems) or "forced")
        build_s = build_engine(onnx_path, plan, key, graph_precision=graph_precision, workspace_gb=workspace_gb,
                               timing_cache=tcache)
        log.info("[%d/%d] %s: built in %.1fs", i, len(names), name, build_s)
        reports[name] = EngineReport(name, str(plan), key.digest(), False, round(build_s, 2),
                                     plan.stat().st_size, problems)
    (cache / "build_report.json").write_text(
        json.dumps({k: r.to_dict() for k, r in reports.items()}, indent=2)
    )
    return reports
