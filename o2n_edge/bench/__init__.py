"""`o2n-edge bench`: per-stage latency of a bundle on the runtime's backends.

Why one entry point: the CLI, the studies in ``benchmarks/`` (which add torch-eager baselines,
quantization, load tests on top of :mod:`o2n_edge.bench.latency`) and the tests all go through
:func:`bench_main`, so a published figure comes from the same code path as a user's run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from o2n_edge.bench.env import UNAVAILABLE, machine_stamp, set_threads
from o2n_edge.bench.latency_report import write_json, write_latency

PRECISIONS = ("fp32", "fp16")
NON_MODEL_TARGET = 0.10  # everything outside model execution < 10% of end to end (lite)


def non_model_targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The lite profile's budget for work outside the graphs, on measured ORT CPU rows at batch 1."""
    out = []
    for res in results:
        if res.get("kind") != "bundle_latency" or res.get("profile") != "lite":
            continue
        for r in res["rows"]:
            if (r.get("backend"), r.get("batch")) == ("ort-cpu", 1) and r.get("non_model_fraction") is not None:
                f = r["non_model_fraction"]
                out.append({"target": f"lite: outside model execution < {100 * NON_MODEL_TARGET:.0f}% of end to "
                                      "end (ORT, b1)", "measured": f"{100 * f:.1f}%", "met": f < NON_MODEL_TARGET})
    return out


def bench_main(bundle: Path, backends: list[str], precision: list[str], batch: list[int], out_dir: Path,
               warmup: int, iters: int, threads: int, name: str | None = None, note: str = "",
               extra_runners: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per-stage latency of ``bundle`` per backend and batch -> JSON + markdown + PNG in ``out_dir``; returns the doc.

    ``fp16`` only checks the bundle's precision (fixed at export). ``extra_runners`` (backend ->
    factory, see :mod:`o2n_edge.bench.latency`) lets a study add a baseline such as torch eager.
    """
    from o2n_edge.bench.latency import BACKENDS, bench_bundle
    from o2n_edge.runtime.bundle import load_bundle

    for p in precision:
        if p not in PRECISIONS:
            raise ValueError(f"unknown precision {p!r}: choose from {', '.join(PRECISIONS)} "
                             "(int8 is a study: python -m benchmarks.ort_knobs)")
    for b in backends:
        if b not in BACKENDS and b not in (extra_runners or {}):
            raise ValueError(f"unknown backend {b!r}: choose from {', '.join(BACKENDS)}")
    if warmup < 0 or iters < 1 or threads < 1 or not batch or any(x < 1 for x in batch):
        raise ValueError("warmup >= 0, iters >= 1, threads >= 1 and batch sizes >= 1 are required")
    set_threads(threads)
    machine, results = machine_stamp(threads), []
    if "fp32" in precision:
        results.append(bench_bundle(Path(bundle), list(backends), list(batch), warmup, iters, threads,
                                    extra_runners=extra_runners))
    if "fp16" in precision:
        prec = load_bundle(bundle).manifest_data.precision
        if prec != "fp16":
            results.append({"kind": "note", "profile": "fp16", "rows": [{"backend": "ort-cpu", "status": UNAVAILABLE,
                            "reason": f"the bundle is {prec}: export with --precision fp16 (fp16 pays off on GPUs)"}]})
    name = name or f"latency_{results[0]['profile'] if results else 'bundle'}"
    doc = {"name": name, "machine": machine, "note": note, "settings": {"warmup": warmup, "iters": iters,
           "threads": threads, "batch": batch, "backends": backends, "precision": precision}, "results": results,
           "targets": non_model_targets(results)}
    doc["paths"] = write_latency(doc, Path(out_dir))
    write_json(Path(out_dir) / f"{name}.json", doc)  # again, now with the paths
    return doc
