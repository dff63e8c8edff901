"""Build TensorRT engines for a bundle's ONNX graphs, on the target device, with a cache.

Why on the target: a TensorRT plan is specific to the GPU, the TensorRT version and (on Jetson)
the JetPack release; it cannot be built on the workstation and shipped. So the bundle carries
ONNX graphs plus each model's optimization profiles (``models[name]["trt_profiles"]``), and this
module builds ``<bundle>/engines/<name>-<key16>.plan`` next to a sidecar JSON holding the
:class:`~o2n_edge.runtime.engine_cache.EngineKey` (onnx sha256, precision flags, every profile's
min/opt/max, TensorRT version, GPU name + compute capability, JetPack). A plan whose key matches
is reused; a timing cache file makes rebuilds (new profile, new bundle) much faster.

This module does not import torch (it runs where only ``o2n-edge[trt]`` is installed) and
imports ``tensorrt`` lazily: without it, or without an NVIDIA GPU, :class:`TensorRTUnavailable`
says what to install and where to run. Written against the TensorRT 10 Python API.

Alternative without our own builder: onnxruntime's TensorRT execution provider with its own
engine cache, configured by :func:`ort_tensorrt_provider_options`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from o2n_edge.runtime.bundle import ENGINES_DIR, load_bundle
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
TIMING_CACHE_NAME = "timing.cache"
PRECISION_FLAGS = {"fp32": (), "fp16": ("fp16",)}
INSTALL_HINT = (
    "pip install 'o2n-edge[trt]' (TensorRT >= 10) on the target machine with an NVIDIA GPU "
    "and driver (on Jetson, TensorRT comes with JetPack: use its python3-libnvinfer). "
    "Without TensorRT, run the bundle with onnxruntime (CPU or CUDA EP) instead."
)


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
    entry: Mapping[str, Any],
    batch_range: tuple[int, int, int] | None = None,
) -> tuple[dict[str, dict[str, list[int]]], ...]:
    """Optimization profiles of a manifest model entry, optionally with a new batch range.

    A new ``(min, opt, max)`` batch replaces axis 0 of every input (the batch axis: only axis
    0 is dynamic in our graphs); other dims keep the exported resolution.
    """
    profiles = entry.get("trt_profiles") or []
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


def build_engine(
    onnx_path: str | Path,
    plan: str | Path,
    key: EngineKey,
    *,
    workspace_gb: float = DEFAULT_WORKSPACE_GB,
    timing_cache: str | Path | None = None,
    norms_fp32: bool = True,
    verbose: bool = False,
) -> float:
    """Parse ``onnx_path``, build a plan for ``key``'s precision/profiles, write plan + sidecar.

    Returns the build time in seconds. With fp16, normalization layers are constrained to fp32
    (``norms_fp32``; same reason as the ONNX fp16 block list: variance overflow).
    """
    trt = _import_tensorrt()
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external data (<name>.onnx.data) relative to the graph.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT cannot parse {onnx_path}:\n  " + "\n  ".join(errors))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if "fp16" in key.precision:
        if not getattr(builder, "platform_has_fast_fp16", True):  # deprecated in TRT 10
            log.warning("this GPU has no fast fp16; building fp16 anyway")
        config.set_flag(trt.BuilderFlag.FP16)
        if norms_fp32:
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

    cache = None
    if timing_cache is not None:
        blob = Path(timing_cache).read_bytes() if Path(timing_cache).is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - t0
    if serialized is None:
        raise EngineBuildError(f"TensorRT failed to build {onnx_path} (see the TensorRT log above)")
    write_plan(plan, memoryview(serialized).tobytes(), key,
               extra={"onnx": Path(onnx_path).name, "build_s": round(build_s, 2),
                      "workspace_gb": workspace_gb, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    if timing_cache is not None and cache is not None:
        tc = Path(timing_cache)
        tmp = tc.with_name(f".{tc.name}.tmp-{os.getpid()}")
        tmp.write_bytes(memoryview(config.get_timing_cache().serialize()).tobytes())
        os.replace(tmp, tc)
    return build_s


def build_engines(
    bundle_dir: str | Path,
    precision: str = "fp16",
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

    ``cache_dir`` defaults to ``<bundle>/engines`` (ignored by bundle verification),
    ``timing_cache`` to ``<cache_dir>/timing.cache``; ``batch_range`` overrides the exported
    profiles' batch axis; ``force`` rebuilds even when a matching plan exists.
    """
    if precision not in PRECISION_FLAGS:
        raise ValueError(f"precision must be one of {sorted(PRECISION_FLAGS)}, got {precision!r}")
    trt, (gpu_name, cc) = check_tensorrt(device)
    bundle = load_bundle(bundle_dir)  # refuses a bundle whose hashes do not match
    cache = Path(cache_dir) if cache_dir is not None else bundle.path / ENGINES_DIR
    cache.mkdir(parents=True, exist_ok=True)
    tcache = Path(timing_cache) if timing_cache is not None else cache / TIMING_CACHE_NAME
    names = list(models) if models is not None else sorted(bundle.models)
    jetpack = jetpack_version()
    reports: dict[str, EngineReport] = {}
    for i, name in enumerate(names, 1):
        if name not in bundle.models:
            raise KeyError(f"bundle has no model {name!r} (has {sorted(bundle.models)})")
        entry = bundle.models[name]
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
        build_s = build_engine(onnx_path, plan, key, workspace_gb=workspace_gb, timing_cache=tcache)
        log.info("[%d/%d] %s: built in %.1fs", i, len(names), name, build_s)
        reports[name] = EngineReport(name, str(plan), key.digest(), False, round(build_s, 2),
                                     plan.stat().st_size, problems)
    (cache / "build_report.json").write_text(
        json.dumps({k: r.to_dict() for k, r in reports.items()}, indent=2)
    )
    return reports


def _shape_option(profile: Mapping[str, Mapping[str, Sequence[int]]], which: str) -> str:
    """``"a:1x4x64x64,b:1"``: the ORT TensorRT EP's profile shape string."""
    return ",".join(f"{n}:{'x'.join(str(d) for d in s[which])}" for n, s in sorted(profile.items()))


def ort_tensorrt_provider_options(
    cache_dir: str | Path,
    fp16: bool = True,
    device_id: int = 0,
    workspace_gb: float = DEFAULT_WORKSPACE_GB,
    profile: Mapping[str, Mapping[str, Sequence[int]]] | None = None,
    fallback: Iterable[str] = ("CUDAExecutionProvider", "CPUExecutionProvider"),
) -> list[Any]:
    """``providers=`` list for onnxruntime-gpu's TensorRT EP with engine + timing caches.

    The EP keys its cached engines by graph and shapes itself; an explicit ``profile`` (one
    of a manifest's ``trt_profiles``) avoids rebuilds when the batch changes. Unsupported
    nodes fall back to the next providers (CUDA, then CPU).
    """
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    opts: dict[str, Any] = {
        "device_id": device_id,
        "trt_fp16_enable": bool(fp16),
        "trt_max_workspace_size": int(workspace_gb * (1 << 30)),
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache),
        "trt_layer_norm_fp32_fallback": True,
    }
    if profile:
        opts["trt_profile_min_shapes"] = _shape_option(profile, "min")
        opts["trt_profile_opt_shapes"] = _shape_option(profile, "opt")
        opts["trt_profile_max_shapes"] = _shape_option(profile, "max")
    providers: list[Any] = [("TensorrtExecutionProvider", opts)]
    for p in fallback:
        providers.append((p, {"device_id": device_id}) if p == "CUDAExecutionProvider" else p)
    return providers
