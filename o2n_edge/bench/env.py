"""What every benchmark result is stamped with, and the measuring helpers they share.

Why a stamp: a latency figure means nothing without the machine, the library versions, the
thread count and how busy the machine was (a load average above the core count inflates every
number). Peak memory is ``VmHWM`` after a reset through ``/proc/self/clear_refs``; where the
kernel refuses the reset the figure is the process peak so far, and the result says so.
"""

from __future__ import annotations

import os
import platform
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Iterator

import numpy as np

PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")
RESET_PEAK_RSS = "5"  # clear_refs value that resets VmHWM to the current RSS
VERSIONED = ("o2n-edge", "numpy", "onnxruntime", "onnx", "torch", "diffusers", "open_clip_torch",
             "fastapi", "uvicorn", "httpx")
PERCENTILES = (50, 90, 99)
UNAVAILABLE = "unavailable on this machine"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ('unknown' where it is not readable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict[str, str]:
    """Installed versions of the packages a timing depends on ('absent' when not installed)."""
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def load_average() -> list[float]:
    """1/5/15-minute load averages: how shared the machine was while measuring."""
    return [round(x, 2) for x in os.getloadavg()]


def machine_stamp(threads: int) -> dict:
    """Machine, versions, thread pools, thread setting and load: the context every figure needs."""
    try:
        from threadpoolctl import threadpool_info

        pools = [{"api": x.get("internal_api"), "threads": x.get("num_threads")} for x in threadpool_info()]
    except ImportError:
        pools = []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"thread_pools": pools, "cpu": cpu_model(), "cores": cores, "platform": platform.platform(),
            "threads": int(threads), "load_average_start": load_average(), "versions": versions(),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _status_mb(key: str) -> float | None:
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        return None
    return None


@contextmanager
def peak_memory() -> Iterator[dict]:
    """Measure the peak RSS (MiB) of a block: yields a dict filled in on exit."""
    try:
        PROC_CLEAR_REFS.write_text(RESET_PEAK_RSS)
        reset = True
    except OSError:
        reset = False
    info: dict = {"reset": reset, "rss_before_mb": _status_mb("VmRSS")}
    try:
        yield info
    finally:
        info["peak_rss_mb"] = _status_mb("VmHWM")
        info["rss_after_mb"] = _status_mb("VmRSS")
        if not reset:
            info["note"] = "peak RSS could not be reset: process peak so far"


def percentiles(values_ms: list[float] | np.ndarray) -> dict[str, float]:
    """p50/p90/p99, mean, min and n of a list of milliseconds, rounded to microseconds."""
    v = np.asarray(values_ms, dtype=np.float64)
    if v.size == 0:
        return {"n": 0}
    out = {f"p{p}": round(float(np.percentile(v, p)), 3) for p in PERCENTILES}
    out.update(mean=round(float(v.mean()), 3), min=round(float(v.min()), 3), n=int(v.size))
    return out


def set_threads(threads: int, limit_blas: bool = True) -> dict:
    """Pin numpy's BLAS pool and, where installed, torch's threads (ORT gets them via its options).

    Why BLAS too: the runtime's scoring is numpy, and OpenBLAS's default one-thread-per-core pool
    made the nearest-neighbour GEMM ~15x slower on a shared 2-core host (measured).
    """
    info: dict = {"blas_threads": "library default"}
    try:
        import torch
    except ImportError:  # the runtime's backends do not need it
        pass
    else:
        torch.set_num_threads(int(threads))
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # can only be set once per process, before any parallel work
            pass
        info["torch_threads"] = torch.get_num_threads()
    if limit_blas:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            info["blas_threads"] = "default (threadpoolctl not installed)"
        else:
            threadpool_limits(limits=int(threads))
            info["blas_threads"] = int(threads)
    return info
