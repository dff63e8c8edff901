"""Latency, cascade, server and quantization benchmarks of o2n-edge bundles (issue 6).

Import-light on purpose: submodules pull in torch / onnxruntime only when a benchmark runs.
:func:`bench_main` is what ``o2n-edge bench`` calls.
"""

from __future__ import annotations

from pathlib import Path


def bench_main(bundle: Path | None, profile: str | None, backends: list[str], precision: list[str],
               batch: list[int], resolution: list[int], out_dir: Path, warmup: int, iters: int,
               threads: int, run_dir: Path | None = None, name: str | None = None, note: str = "") -> dict:
    """See :func:`o2n_edge.bench.suite.bench_main`."""
    from o2n_edge.bench.suite import bench_main as _main

    return _main(bundle, profile, backends, precision, batch, resolution, out_dir, warmup, iters, threads, run_dir,
                 name, note)


__all__ = ["bench_main"]
