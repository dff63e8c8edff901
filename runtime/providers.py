"""Execution-provider setup: the TensorRT EP's options for a bundle, and a check of the ORT install.

Why here (runtime, stdlib + onnxruntime only): the line-side pipeline builds its sessions from
these, and ``o2n-edge doctor`` reports the same checks, so what the doctor says is what serving does.

- :func:`tensorrt_session_options`: the TensorRT EP with its engine and timing caches beside the
  bundle's engines (``<bundle>/engines/ort-trt``), the bundle's shape profile, and fp16 when the
  bundle is fp16. Without these the EP runs with its defaults: fp32, and every engine rebuilt at
  every start (minutes for an SD UNet).
- :func:`install_problems`: ``onnxruntime`` and ``onnxruntime-gpu`` both install the module
  ``onnxruntime``; with both present the CUDA provider is commonly missing (onnxruntime issue
  26996) and everything silently runs on the CPU. Each problem comes with the exact command that
  fixes it.
- :func:`probe_sessions`: ``get_available_providers()`` lists every provider compiled in, even
  when CUDA, cuDNN or libnvinfer cannot be loaded; that failure only shows when a session is
  created (it silently gets the CPU). So the doctor creates a session on a small shipped graph
  per GPU provider and checks what the session really got.
"""

from __future__ import annotations

import importlib.metadata as metadata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from o2n_edge.runtime.manifest import BundleManifest

DEFAULT_WORKSPACE_GB = 4.0
ORT_TRT_CACHE = "ort-trt"  # under the bundle's engines/ (ignored by bundle verification)
ORT_TRT_ENGINE_SUFFIX = ".engine"  # what the TensorRT EP writes into its engine cache folder
PROBE_GRAPH = Path(__file__).resolve().parent / "static" / "bank_search.onnx"  # 2 nodes, shipped
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
FIX_CUDA_LIBS = ("the CUDA 12 / cuDNN 9 libraries onnxruntime-gpu needs cannot be loaded: pip install "
                 "'nvidia-cudnn-cu12>=9,<10' nvidia-cublas-cu12 and call onnxruntime.preload_dlls(), or use "
                 "an nvidia/cuda:12.x-cudnn image")
FIX_TRT_LIBS = ("libnvinfer cannot be loaded by the TensorRT EP: pip install 'o2n-edge[trt]' (tensorrt-cu12 on "
                "PyPI is an sdist that downloads its wheels from NVIDIA's index, pypi.nvidia.com, at install "
                "time) and put site-packages/tensorrt_libs on LD_LIBRARY_PATH")
CPU_PACKAGE = "onnxruntime"
GPU_PACKAGE = "onnxruntime-gpu"
# Other onnxruntime builds that also install the ``onnxruntime`` module.
OTHER_PACKAGES = ("onnxruntime-directml", "onnxruntime-openvino", "onnxruntime-qnn", "onnxruntime-training")
FIX_BOTH = (f"pip uninstall -y {CPU_PACKAGE} {GPU_PACKAGE} && pip install 'o2n-edge[gpu]' "
            f"(both install the onnxruntime module; with both, the CUDA provider is commonly missing: "
            f"onnxruntime issue 26996)")
FIX_NO_GPU_PACKAGE = f"pip uninstall -y {CPU_PACKAGE} && pip install 'o2n-edge[gpu]'"
FIX_GPU_BROKEN = (f"pip install --force-reinstall --no-deps {GPU_PACKAGE} (and check that the CUDA 12 / cuDNN 9 "
                  "libraries it needs are installed: python -c 'import onnxruntime as o; o.preload_dlls()')")


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
    timing_cache_dir: str | Path | None = None,
) -> list[Any]:
    """``providers=`` list for onnxruntime-gpu's TensorRT EP with engine + timing caches.

    The EP keys its cached engines by graph and shapes itself; an explicit ``profile`` (one
    of a manifest's ``trt_profiles``) avoids rebuilds when the batch changes. Unsupported
    nodes fall back to the next providers (CUDA, then CPU).
    """
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    timing = Path(timing_cache_dir) if timing_cache_dir is not None else cache
    timing.mkdir(parents=True, exist_ok=True)
    opts: dict[str, Any] = {
        "device_id": device_id,
        "trt_fp16_enable": bool(fp16),
        "trt_max_workspace_size": int(workspace_gb * (1 << 30)),
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(timing),
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


def tensorrt_session_options(bundle_path: str | Path, manifest: BundleManifest, name: str,
                             device_id: int = 0) -> dict[str, Any]:
    """The TensorRT EP's options for model ``name`` of a bundle (caches beside its engines).

    fp16 follows the bundle: an fp16 bundle's graphs carry fp16 types (TensorRT 11 takes precision
    from them; on 10.x the flag lets the EP pick fp16 kernels), an fp32 bundle runs fp32.
    Each model's engines go to their own folder (:func:`ort_trt_engine_dir`) so a check can tell
    which model the EP really took (an EP that took zero nodes writes no engine); the timing
    cache is shared.
    """
    profiles = manifest.model(name).trt_profiles or []
    cache = Path(bundle_path) / "engines" / ORT_TRT_CACHE
    providers = ort_tensorrt_provider_options(ort_trt_engine_dir(bundle_path, name),
                                              fp16=manifest.precision == "fp16", device_id=device_id,
                                              profile=profiles[0] if profiles else None, fallback=(),
                                              timing_cache_dir=cache)
    return providers[0][1]


def ort_trt_engine_dir(bundle_path: str | Path, name: str) -> Path:
    """The TensorRT EP's engine cache folder of model ``name`` in a bundle."""
    return Path(bundle_path) / "engines" / ORT_TRT_CACHE / name


def ort_trt_engine_files(bundle_path: str | Path, name: str) -> list[Path]:
    """Engines the TensorRT EP built for model ``name``: none means the EP ran none of its nodes.

    Why: a session whose first provider is the TensorRT EP may still run every node on CUDA or
    the CPU (unsupported ops, or an engine build that failed and fell back); only the EP's engine
    files prove it built something.
    """
    folder = ort_trt_engine_dir(bundle_path, name)
    return sorted(folder.glob(f"*{ORT_TRT_ENGINE_SUFFIX}")) if folder.is_dir() else []


# ------------------------------------------------------------------------------ install checks


@dataclass(frozen=True)
class Problem:
    """Something wrong with the execution install, and the exact command that fixes it."""

    what: str
    fix: str

    def line(self) -> str:
        return f"{self.what}: {self.fix}"


def installed_versions(names: Iterable[str], version: Callable[[str], str] | None = None) -> dict[str, str]:
    """Installed distributions among ``names`` (package metadata, not the module: both share one)."""
    version = version or metadata.version  # looked up at call time (tests stand it in)
    found = {}
    for n in names:
        try:
            found[n] = version(n)
        except metadata.PackageNotFoundError:
            continue
    return found


def install_problems(
    available_providers: Sequence[str] | None = None,
    gpu_visible: bool | None = None,
    version: Callable[[str], str] | None = None,
) -> list[Problem]:
    """What is wrong with this onnxruntime install for the GPU, with the fix; [] when nothing is.

    ``available_providers`` defaults to onnxruntime's, ``gpu_visible`` to an NVIDIA GPU check;
    ``version`` is ``importlib.metadata.version`` (tests pass a stand-in).
    """
    pkgs = installed_versions((CPU_PACKAGE, GPU_PACKAGE, *OTHER_PACKAGES), version)
    problems = []
    if not pkgs:
        problems.append(Problem("no onnxruntime package is installed",
                                "pip install 'o2n-edge[cpu]' (or 'o2n-edge[gpu]' on an NVIDIA machine)"))
        return problems
    if CPU_PACKAGE in pkgs and GPU_PACKAGE in pkgs:
        problems.append(Problem(f"both {CPU_PACKAGE} {pkgs[CPU_PACKAGE]} and {GPU_PACKAGE} {pkgs[GPU_PACKAGE]} "
                                "are installed", FIX_BOTH))
    others = [f"{n} {v}" for n, v in pkgs.items() if n in OTHER_PACKAGES]
    if others and (CPU_PACKAGE in pkgs or GPU_PACKAGE in pkgs):
        problems.append(Problem(f"several onnxruntime builds share the onnxruntime module ({', '.join(others)})",
                                f"pip uninstall -y {' '.join(n.split()[0] for n in others)}"))
    if gpu_visible is None:
        from o2n_edge.runtime.engine_cache import gpu_info

        gpu_visible = gpu_info() is not None
    if available_providers is None:
        try:
            import onnxruntime as ort

            available_providers = list(ort.get_available_providers())
        except Exception:  # noqa: BLE001 - a broken install is itself the problem reported
            available_providers = []
    if gpu_visible and "CUDAExecutionProvider" not in available_providers:
        if GPU_PACKAGE not in pkgs:
            problems.append(Problem("an NVIDIA GPU is visible but only the CPU build of onnxruntime is installed",
                                    FIX_NO_GPU_PACKAGE))
        elif CPU_PACKAGE not in pkgs:
            problems.append(Problem(f"{GPU_PACKAGE} is installed but its CUDA provider is not available",
                                    FIX_GPU_BROKEN))
    return problems


# ------------------------------------------------------------------------------ session probes


@dataclass(frozen=True)
class SessionProbe:
    """One session created on the probe graph with ``provider`` first: what it really got."""

    provider: str
    got: tuple[str, ...] = ()  # session.get_providers()
    error: str | None = None  # session creation raised

    @property
    def ok(self) -> bool:
        """The session's first provider is the one asked for (not a silent CPU fallback)."""
        return self.error is None and bool(self.got) and self.got[0] == self.provider

    def line(self) -> str:
        """``CUDAExecutionProvider: session ok`` or what the session got instead."""
        if self.ok:
            return f"{self.provider}: session ok"
        got = ", ".join(self.got) or "no session"
        return f"{self.provider}: session got {got}" + (f" ({self.error})" if self.error else "")


def probe_sessions(available: Sequence[str] | None = None, graph: str | Path = PROBE_GRAPH) -> list[SessionProbe]:
    """Create a session on ``graph`` with CUDA, then TensorRT, first, for each that onnxruntime lists.

    ``available`` defaults to ``get_available_providers()``; a provider not listed is not probed.
    ORT's own fallback warning is silenced (severity 3): the result says it instead.
    """
    import onnxruntime as ort

    listed = list(ort.get_available_providers()) if available is None else list(available)
    probes = []
    for provider in GPU_PROVIDERS:
        if provider not in listed:
            continue
        so = ort.SessionOptions()
        so.log_severity_level = 3
        try:
            sess = ort.InferenceSession(str(graph), sess_options=so, providers=[provider, "CPUExecutionProvider"])
            probes.append(SessionProbe(provider, tuple(sess.get_providers())))
        except Exception as exc:  # noqa: BLE001 - a failing provider is the finding, not a crash
            probes.append(SessionProbe(provider, (), f"{type(exc).__name__}: {exc}"))
    return probes


def probe_problems(probes: Iterable[SessionProbe]) -> list[Problem]:
    """A :class:`Problem` per GPU provider that onnxruntime lists but a session could not use."""
    fixes = {"CUDAExecutionProvider": FIX_CUDA_LIBS, "TensorrtExecutionProvider": FIX_TRT_LIBS}
    return [Problem(f"{p.provider} is listed but a session on it fell back ({p.line()})", fixes[p.provider])
            for p in probes if not p.ok]
