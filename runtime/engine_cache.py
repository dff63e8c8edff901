"""TensorRT engine cache keys and sidecars, shared by the engine builder and the runtime.

Why: a TensorRT plan is only valid for the exact graph, precision flags, shape profiles,
TensorRT version and GPU (and JetPack, on Jetson) it was built with; loading a stale plan either
fails deep inside TensorRT or, worse, runs a graph that no longer matches the bundle. So every
plan gets a sidecar JSON (``<plan>.json``) holding its :class:`EngineKey`, and a plan is used
only when the key computed on the device now equals the sidecar's and the plan's sha256 matches.

The key is computed here, once, so the builder (``o2n_edge.export.tensorrt_build``) and the
runtime can never disagree on it. Standard library only: this module must stay
importable on a line-side device that has no torch (and maybe no TensorRT: the device-query
helpers return None instead of raising).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import json
import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from o2n_edge.atomic import atomic_write_bytes

from .bundle import sha256_file

KEY_VERSION = 1  # bump when the key's definition changes: old plans are then rebuilt
SIDECAR_SUFFIX = ".json"
PLAN_SUFFIX = ".plan"
DIGEST_CHARS = 16  # of the key's sha256 in the plan file name
TEGRA_RELEASE = Path("/etc/nv_tegra_release")
CUDA_LIBS = ("libcuda.so.1", "libcuda.so", "nvcuda.dll")
CU_ATTR_CC_MAJOR = 75  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
CU_ATTR_CC_MINOR = 76  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR
PROFILE_FIELDS = ("min", "opt", "max")

# One optimization profile: input name -> {"min": shape, "opt": shape, "max": shape}.
Profile = Mapping[str, Mapping[str, Sequence[int]]]


def model_digest(onnx_path: str | Path) -> str:
    """sha256 of an ONNX graph including its external-data file (``<file>.data``) if present.

    Large graphs (> 2 GB) keep their weights in ``<name>.onnx.data``; hashing only the
    ``.onnx`` would miss a weight change, so both are folded into one digest.
    """
    onnx_path = Path(onnx_path)
    digest = sha256_file(onnx_path)
    data = onnx_path.with_name(onnx_path.name + ".data")
    if data.is_file():
        digest = hashlib.sha256(f"{digest}:{sha256_file(data)}".encode()).hexdigest()
    return digest


def normalize_profiles(profiles: Iterable[Profile]) -> tuple[dict[str, dict[str, list[int]]], ...]:
    """Canonical, JSON-able profiles (sorted input names, int lists) checked for min<=opt<=max."""
    out = []
    for prof in profiles:
        canon: dict[str, dict[str, list[int]]] = {}
        for name in sorted(prof):
            shapes = prof[name]
            missing = [f for f in PROFILE_FIELDS if f not in shapes]
            if missing:
                raise ValueError(f"profile of input {name!r} lacks {missing}")
            mn, opt, mx = ([int(d) for d in shapes[f]] for f in PROFILE_FIELDS)
            if not (len(mn) == len(opt) == len(mx)):
                raise ValueError(f"profile of input {name!r}: min/opt/max ranks differ")
            if any(not (a <= b <= c) for a, b, c in zip(mn, opt, mx)):
                raise ValueError(f"profile of input {name!r}: need min <= opt <= max, got {shapes}")
            canon[name] = {"min": mn, "opt": opt, "max": mx}
        out.append(canon)
    return tuple(out)


@dataclass(frozen=True)
class EngineKey:
    """Everything a TensorRT plan depends on; equal keys mean a cached plan is reusable."""

    onnx_sha256: str
    precision: tuple[str, ...]  # builder precision flags, e.g. ("fp16",)
    profiles: tuple[dict[str, dict[str, list[int]]], ...]
    trt_version: str
    gpu_name: str
    compute_capability: str  # "8.6"
    jetpack: str | None = None  # "R36.4.0" on Jetson, else None
    options: dict[str, Any] = field(default_factory=dict)  # other plan-changing builder options
    key_version: int = KEY_VERSION

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (tuples become lists) as stored in the sidecar."""
        d = asdict(self)
        d["precision"] = list(self.precision)
        d["profiles"] = list(self.profiles)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EngineKey:
        """Inverse of :meth:`to_dict` (raises KeyError/TypeError on malformed input)."""
        return cls(
            onnx_sha256=d["onnx_sha256"],
            precision=tuple(d["precision"]),
            profiles=normalize_profiles(d["profiles"]),
            trt_version=d["trt_version"],
            gpu_name=d["gpu_name"],
            compute_capability=d["compute_capability"],
            jetpack=d.get("jetpack"),
            options=dict(d.get("options", {})),
            key_version=int(d.get("key_version", KEY_VERSION)),
        )

    def digest(self) -> str:
        """sha256 of the canonical JSON of the key (names the plan file)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def diff(self, other: EngineKey) -> list[str]:
        """Names of the fields that differ (for a readable 'why rebuild' message)."""
        a, b = self.to_dict(), other.to_dict()
        return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def engine_key(
    onnx_path_or_sha: str | Path,
    precision: Iterable[str],
    profiles: Iterable[Profile],
    trt_version: str,
    gpu_name: str,
    compute_capability: str | tuple[int, int],
    jetpack: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> EngineKey:
    """Build the cache key; ``onnx_path_or_sha`` is a graph path (hashed) or a 64-hex digest."""
    ref = str(onnx_path_or_sha)
    sha = ref if re.fullmatch(r"[0-9a-f]{64}", ref) else model_digest(ref)
    if isinstance(compute_capability, tuple):
        compute_capability = f"{compute_capability[0]}.{compute_capability[1]}"
    return EngineKey(
        onnx_sha256=sha,
        precision=tuple(sorted({p.lower() for p in precision})),
        profiles=normalize_profiles(profiles),
        trt_version=str(trt_version),
        gpu_name=str(gpu_name),
        compute_capability=str(compute_capability),
        jetpack=jetpack,
        options=dict(sorted((options or {}).items())),
    )


def plan_path(cache_dir: str | Path, name: str, key: EngineKey) -> Path:
    """``<cache_dir>/<name>-<digest16>.plan``: several keys for one model can coexist."""
    return Path(cache_dir) / f"{name}-{key.digest()[:DIGEST_CHARS]}{PLAN_SUFFIX}"


def sidecar_path(plan: str | Path) -> Path:
    """The JSON sidecar next to a plan."""
    plan = Path(plan)
    return plan.with_name(plan.name + SIDECAR_SUFFIX)


def write_plan(plan: str | Path, data: bytes, key: EngineKey, extra: Mapping[str, Any] | None = None) -> Path:
    """Write a plan then its sidecar (sidecar last: it is the 'complete' marker)."""
    plan = Path(plan)
    plan.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(plan, bytes(data))  # whole or not at all: a crash never leaves a truncated plan
    side = {
        "key": key.to_dict(),
        "key_digest": key.digest(),
        "plan_sha256": hashlib.sha256(bytes(data)).hexdigest(),
        "plan_bytes": len(data),
        **dict(extra or {}),
    }
    atomic_write_bytes(sidecar_path(plan), json.dumps(side, indent=2, sort_keys=True).encode())
    return plan


def check_plan(plan: str | Path, expected: EngineKey, check_sha: bool = True) -> list[str]:
    """Problems that forbid using ``plan`` for ``expected`` (empty list = reuse it)."""
    plan = Path(plan)
    side_path = sidecar_path(plan)
    if not plan.is_file():
        return [f"{plan.name}: no plan"]
    if not side_path.is_file():
        return [f"{plan.name}: no sidecar {side_path.name}"]
    try:
        side = json.loads(side_path.read_text(encoding="utf-8"))
        found = EngineKey.from_dict(side["key"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{side_path.name}: malformed sidecar ({exc})"]
    problems = []
    if found != expected:
        problems.append(f"{plan.name}: built for a different {', '.join(found.diff(expected))}")
    if check_sha and sha256_file(plan) != side.get("plan_sha256"):
        problems.append(f"{plan.name}: sha256 mismatch (truncated or modified plan)")
    return problems


def find_plan(cache_dir: str | Path, name: str, key: EngineKey) -> Path | None:
    """The cached plan for ``key`` if it exists and checks out, else None."""
    plan = plan_path(cache_dir, name, key)
    return plan if not check_plan(plan, key) else None


def find_plans(
    cache_dir: str | Path,
    name: str,
    onnx_path_or_sha: str | Path,
    device: int = 0,
) -> list[tuple[Path, EngineKey]]:
    """Every cached plan of ``name`` usable on this device for this graph, any precision/profile.

    For a runtime that does not know which precision or batch range the plans were built
    with: each sidecar's precision/profiles/options are combined with *this* device's facts
    and graph digest, and only plans whose full key (and sha256) checks out are returned.
    """
    cache = Path(cache_dir)
    ref = str(onnx_path_or_sha)
    sha = ref if re.fullmatch(r"[0-9a-f]{64}", ref) else model_digest(ref)
    found = []
    for plan in sorted(cache.glob(f"{name}-*{PLAN_SUFFIX}")):
        try:
            stored = EngineKey.from_dict(json.loads(sidecar_path(plan).read_text())["key"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        expected = device_key(sha, stored.precision, stored.profiles, device, stored.options)
        if expected is not None and not check_plan(plan, expected):
            found.append((plan, expected))
    return found


# --- device facts (never raise: None means "not available here") -----------------------------


def jetpack_version(release_file: str | Path = TEGRA_RELEASE) -> str | None:
    """L4T release of a Jetson (e.g. ``R36.4.0``) from ``/etc/nv_tegra_release``, else None."""
    path = Path(release_file)
    if not path.is_file():
        return None
    text = path.read_text(errors="replace")
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"R{m.group(1)}.{m.group(2)}" if m else text.strip().splitlines()[0][:80]


def tensorrt_version() -> str | None:
    """Installed TensorRT Python package version, or None (import is lazy: never at load)."""
    try:
        return str(importlib.import_module("tensorrt").__version__)
    except Exception:  # noqa: BLE001 - a broken TRT install is "unavailable", not a crash
        return None


def _gpu_info_cuda(device: int) -> tuple[str, str] | None:
    """GPU name and compute capability through the CUDA driver API (works on Jetson too)."""
    for lib in CUDA_LIBS:
        try:
            cuda = ctypes.CDLL(lib)
            break
        except OSError:
            continue
    else:
        return None
    if cuda.cuInit(0) != 0:
        return None
    dev = ctypes.c_int()
    if cuda.cuDeviceGet(ctypes.byref(dev), device) != 0:
        return None
    name = ctypes.create_string_buffer(256)
    major, minor = ctypes.c_int(), ctypes.c_int()
    if (
        cuda.cuDeviceGetName(name, len(name), dev) != 0
        or cuda.cuDeviceGetAttribute(ctypes.byref(major), CU_ATTR_CC_MAJOR, dev) != 0
        or cuda.cuDeviceGetAttribute(ctypes.byref(minor), CU_ATTR_CC_MINOR, dev) != 0
    ):
        return None
    return name.value.decode(errors="replace"), f"{major.value}.{minor.value}"


def _gpu_info_smi(device: int) -> tuple[str, str] | None:
    """Fallback through nvidia-smi (discrete GPUs) when libcuda cannot be loaded directly."""
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--id={device}", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    parts = [p.strip() for p in out.splitlines()[0].split(",")] if out else []
    return (parts[0], parts[1]) if len(parts) == 2 else None


def gpu_info(device: int = 0) -> tuple[str, str] | None:
    """``(name, "major.minor")`` of NVIDIA GPU ``device``, or None when there is none."""
    try:
        return _gpu_info_cuda(device) or _gpu_info_smi(device)
    except Exception:  # noqa: BLE001 - odd driver states mean "no usable GPU"
        return None


def device_key(
    onnx_path_or_sha: str | Path,
    precision: Iterable[str],
    profiles: Iterable[Profile],
    device: int = 0,
    options: Mapping[str, Any] | None = None,
) -> EngineKey | None:
    """The key for this machine now (TensorRT version, GPU, JetPack), or None without TRT/GPU."""
    trt_ver, gpu = tensorrt_version(), gpu_info(device)
    if trt_ver is None or gpu is None:
        return None
    return engine_key(onnx_path_or_sha, precision, profiles, trt_ver, gpu[0], gpu[1],
                      jetpack=jetpack_version(), options=options)
