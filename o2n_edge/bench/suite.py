"""`o2n-edge bench`: the plain function the CLI calls, and the latency targets it checks.

Why one entry point: the CLI, ``benchmarks/*.py`` and the tests all go through
:func:`bench_main`, so a figure in README always comes from the same code path as a user's run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from o2n_edge.bench.env import UNAVAILABLE, machine_stamp, set_threads
from o2n_edge.bench.report import write_json, write_latency

PRECISIONS = ("fp32", "int8", "fp16")
ORT_SPEEDUP_TARGET = 1.5  # ORT CPU >= 1.5x torch eager per image, batch 1
NON_MODEL_TARGET = 0.10  # everything outside model execution < 10% of end to end (lite)
REAL_SIZE_PROFILE = "sd15"
SD15_STEPS = 4  # the sd15 profile's LCM steps (o2n_edge.profiles)


def latency_targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's latency targets, evaluated on measured rows only (with the distance)."""
    out = []
    for res in results:
        if res.get("kind") != "bundle_latency":
            continue
        rows = {(r["backend"], r.get("batch")): r for r in res["rows"] if r.get("status") == "measured"}
        t, o = rows.get(("torch", 1)), rows.get(("ort-cpu", 1))
        if t and o:
            s = t["per_image_ms_p50"] / o["per_image_ms_p50"]
            out.append({"target": f"{res['profile']}: ORT CPU >= {ORT_SPEEDUP_TARGET}x torch eager per image, batch 1",
                        "measured": f"{s:.2f}x ({t['per_image_ms_p50']:.1f} -> {o['per_image_ms_p50']:.1f} ms)",
                        "met": s >= ORT_SPEEDUP_TARGET})
        if o and res["profile"] == "lite" and o.get("non_model_fraction") is not None:
            f = o["non_model_fraction"]
            out.append({"target": f"lite: outside model execution < {100 * NON_MODEL_TARGET:.0f}% of end to end (ORT, b1)",
                        "measured": f"{100 * f:.1f}%", "met": f < NON_MODEL_TARGET})
    return out


def bench_main(bundle: Path | None, profile: str | None, backends: list[str], precision: list[str],
               batch: list[int], resolution: list[int], out_dir: Path, warmup: int, iters: int,
               threads: int, run_dir: Path | None = None, name: str | None = None, note: str = "") -> dict:
    """Run the latency benchmark and write JSON + markdown + PNG into ``out_dir``.

    - ``bundle``: per-stage latency of that bundle for each backend (``torch`` = eager reference,
      ``ort-cpu``, ``ort-cuda``, ``ort-tensorrt``, ``tensorrt``; missing ones are reported as
      unavailable, never estimated) at each ``batch``; ``precision`` ``int8`` adds ORT rows with
      dynamically quantized UNet and image encoder. ``resolution`` is fixed by the bundle.
    - no bundle and ``profile == "sd15"``: the real-size SD-1.5 UNet/VAE and CLIP ViT-B/16 at each
      ``resolution`` (seeded random weights), torch vs ORT CPU, batch 1.
    ``run_dir``: the personalized run the bundle was exported from, for the torch rows (default:
    where `o2n-edge export` caches it, ``runs/export-<dataset>-<category>-<profile>-k<k>-s<seed>``).
    ``name``: the result files' name (default ``latency_<profile>``); ``note``: a paragraph for them.
    Returns the result document (with ``paths``).
    """
    from o2n_edge.bench.latency import BACKENDS, bench_bundle, speedups

    for p in precision:
        if p not in PRECISIONS:
            raise ValueError(f"unknown precision {p!r}: choose from {', '.join(PRECISIONS)}")
    for b in backends:
        if b not in BACKENDS:
            raise ValueError(f"unknown backend {b!r}: choose from {', '.join(BACKENDS)}")
    if warmup < 0 or iters < 1 or threads < 1 or any(x < 1 for x in batch):
        raise ValueError("warmup >= 0, iters >= 1, threads >= 1 and batch sizes >= 1 are required")
    set_threads(threads)
    machine = machine_stamp(threads)
    if bundle is None:
        if profile != REAL_SIZE_PROFILE:
            raise ValueError(f"pass --bundle for profile {profile!r} (only {REAL_SIZE_PROFILE!r} runs without one: "
                             "real-size models with random weights)")
        from o2n_edge.bench.models_real_size import bench_real_size

        from o2n_edge.bench.models_real_size import transform_estimate

        res = bench_real_size(resolution, warmup, iters, threads)
        res["steps"] = SD15_STEPS
        res["per_image"] = {r: transform_estimate(res["rows"], SD15_STEPS, r) for r in resolution}
        doc = {"name": "latency_real_size", "machine": machine, "results": [res]}
        from o2n_edge.bench.models_real_size import write_real_size

        doc["paths"] = write_real_size(doc, out_dir)
        return doc
    results = []
    fp = bench_bundle(Path(bundle), list(backends), list(batch), warmup, iters, threads, run_dir) if "fp32" in precision else None
    if fp:
        fp["speedups"] = speedups(fp)
        results.append(fp)
    if "int8" in precision:
        from o2n_edge.bench.quantize import quantized_overrides

        overrides = quantized_overrides(Path(bundle))
        q = bench_bundle(Path(bundle), ["ort-cpu"], list(batch), warmup, iters, threads, overrides=overrides)
        q["title"] = "int8 dynamic"
        q["profile"] = f"{q['profile']} int8"
        results.append(q)
    if "fp16" in precision:
        from o2n_edge.runtime.bundle import load_bundle

        prec = load_bundle(bundle).manifest.get("precision")
        if prec != "fp16":
            results.append({"kind": "note", "profile": "fp16", "rows": [{"backend": "ort-cpu", "status": UNAVAILABLE,
                            "reason": f"the bundle is {prec}: export with --precision fp16 (fp16 pays off on GPUs)"}]})
    name = name or f"latency_{results[0]['profile'] if results else 'bundle'}"
    doc = {"name": name, "machine": machine, "note": note, "settings": {"warmup": warmup, "iters": iters, "threads": threads,
           "batch": batch, "backends": backends, "precision": precision}, "results": results,
           "targets": latency_targets(results)}
    doc["paths"] = write_latency(doc, Path(out_dir))
    write_json(Path(out_dir) / f"{name}.json", doc)
    return doc
