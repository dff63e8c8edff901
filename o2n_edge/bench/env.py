"""What every benchmark result is stamped with, and the measuring helpers they share.

Why a stamp: a latency figure means nothing without the machine, the library versions, the
thread count and how busy the machine was (this project's CI hosts are shared; a load average
above the core count inflates every number). Every result JSON carries :func:`machine_stamp`.

Peak memory is read from ``/proc/self/status`` (``VmHWM``) after resetting it through
``/proc/self/clear_refs`` (Linux >= 4.0), so two backends measured in one process each get
their own peak; where the reset is refused the figure is the process peak so far, and the
result says so.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")
PROC_CPUINFO = Path("/proc/cpuinfo")
RESET_PEAK_RSS = "5"  # clear_refs value that resets VmHWM to the current RSS
VERSIONED = ("o2n-edge", "numpy", "onnxruntime", "onnx", "torch", "diffusers", "open_clip_torch",
             "fastapi", "uvicorn", "httpx")
PERCENTILES = (50, 90, 99)
UNAVAILABLE = "unavailable on this machine"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ('unknown' where it is not readable)."""
    try:
        for line in PROC_CPUINFO.read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    """Cores this process may run on (the container's affinity, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


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


def blas_threads() -> list[dict]:
    """numpy/torch BLAS and OpenMP pools in this process and their current sizes."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [{"api": x.get("internal_api"), "threads": x.get("num_threads")} for x in threadpool_info()]


def machine_stamp(threads: int) -> dict:
    """Machine, versions, thread setting and load: the context every figure needs."""
    return {
        "thread_pools": blas_threads(),
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "platform": platform.platform(),
        "threads": int(threads),
        "load_average_start": load_average(),
        "versions": versions(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _status_kb(key: str) -> int | None:
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS to its current RSS; False where the kernel refuses."""
    try:
        PROC_CLEAR_REFS.write_text(RESET_PEAK_RSS)
        return True
    except OSError:
        return False


def rss_mb() -> float | None:
    """Current resident set size in MiB."""
    kb = _status_kb("VmRSS")
    return None if kb is None else round(kb / 1024.0, 1)


def peak_rss_mb() -> float | None:
    """Peak resident set size (since the last reset) in MiB."""
    kb = _status_kb("VmHWM")
    return None if kb is None else round(kb / 1024.0, 1)


@contextmanager
def peak_memory() -> Iterator[dict]:
    """Measure the peak RSS of a block: yields a dict filled in on exit."""
    info: dict = {"reset": reset_peak_rss(), "rss_before_mb": rss_mb()}
    try:
        yield info
    finally:
        info["peak_rss_mb"] = peak_rss_mb()
        info["rss_after_mb"] = rss_mb()
        if not info["reset"]:
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
    """Pin torch's intra-op threads and numpy's BLAS pool (ORT gets ``threads`` via its options).

    Why BLAS too: the runtime's scoring is numpy; OpenBLAS starts one thread per core by
    default, and on a shared 2-core host its spinning threads made the tiny bundle's
    nearest-neighbour GEMM ~15x slower (measured, ``latency_tiny_blas_default``). A fair
    comparison gives every library the same thread count.
    """
    import torch

    torch.set_num_threads(int(threads))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # can only be set once per process, before any parallel work
        pass
    info = {"torch_threads": torch.get_num_threads(), "blas_threads": "library default"}
    if limit_blas:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            info["blas_threads"] = "default (threadpoolctl not installed)"
        else:
            threadpool_limits(limits=int(threads))
            info["blas_threads"] = int(threads)
    return info


def run_clients(
    work: Callable[[int, int], Any], clients: int, per_client: int, time_limit_s: float
) -> tuple[list[float], list[tuple[int, Any]], float]:
    """``clients`` threads each calling ``work(client, request)`` up to ``per_client`` times.

    Shared by the load benchmarks (serve, Triton) so both drive their servers the same way: a
    client stops early once ``time_limit_s`` has passed, so a slow path cannot stall the run.
    Returns each request's latency (ms), ``(request index, what work returned)`` and the wall s.
    """
    lat: list[float] = []
    results: list[tuple[int, Any]] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + time_limit_s

    def client(cid: int) -> None:
        for i in range(per_client):
            if time.perf_counter() > deadline:
                return
            request = cid * per_client + i
            t0 = time.perf_counter()
            out = work(cid, request)
            dt = (time.perf_counter() - t0) * 1000.0
            with lock:
                lat.append(dt)
                results.append((request, out))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        list(ex.map(client, range(clients)))
    return lat, results, time.perf_counter() - t0
