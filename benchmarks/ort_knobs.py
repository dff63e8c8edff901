"""ORT CPU session knobs and dynamic int8 on one bundle: latency side by side, int8 accuracy on real images.

Knobs (threads, graph optimization level, memory arena, bank search backend) run interleaved in
one loop at batch 1. int8: fp32 vs dynamically quantized UNet + image encoder, interleaved, and
the image AUROC through the runtime on every test image of the category (int8 noise changes
every feature distance, so speed alone says nothing).

Usage: python -m benchmarks.ort_knobs --bundle bundles/hazelnut-lite [--data ../shared/data/hazelnut_toy]
Writes benchmarks/results/ort_knobs_<profile>.{json,md} (int8 rows only with --data).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import RESULTS, machine_stamp, set_threads, stamp_lines, write_result
from benchmarks.variants import Variant, quantized_overrides, score_test_set
from o2n_edge.bench.latency import make_runner, run_interleaved, source_images, summarize

KNOB_SETTINGS = (
    {"name": "threads=1, opt=all, arena=on", "threads": 1, "graph_optimization": "all", "mem_arena": True},
    {"name": "threads=2, opt=all, arena=on", "threads": 2, "graph_optimization": "all", "mem_arena": True},
    {"name": "threads=1, opt=basic, arena=on", "threads": 1, "graph_optimization": "basic", "mem_arena": True},
    {"name": "threads=1, opt=all, arena=off", "threads": 1, "graph_optimization": "all", "mem_arena": False},
    {"name": "threads=1, opt=all, arena=on, bank search numpy", "threads": 1, "graph_optimization": "all",
     "mem_arena": True, "bank_search": "numpy"},
)


def auroc_through_runtime(bundle: Path, data: Path, category: str, threads: int,
                          overrides: dict[str, Path] | None = None) -> dict[str, Any]:
    """Image AUROC of the runtime on the category's test set (optionally with swapped graphs)."""
    from o2n_edge.data import load_dataset, load_image
    from o2n_edge.detection_metrics import image_auroc

    ds = load_dataset(data, None, category)
    t0 = time.perf_counter()
    out = score_test_set(Variant("", bundle, dict(overrides or {})), [load_image(s.path) for s in ds.test], threads)
    scores = out["scores"]
    return {"image_auroc": round(image_auroc(ds.labels, scores), 4), "n": len(scores),
            "scores": [round(float(x), 5) for x in scores], "wall_s": round(time.perf_counter() - t0, 1)}


def int8_study(bundle: Path, data: Path, category: str, threads: int, warmup: int, iters: int) -> dict[str, Any]:
    """fp32 vs int8 (UNet + encoder): per-image latency side by side and image AUROC on real data."""
    overrides = quantized_overrides(bundle)
    fp = make_runner("ort-cpu", bundle, threads)
    fp.name = "ort-cpu fp32"
    q = make_runner("ort-cpu", bundle, threads, overrides=overrides)
    q.name = "ort-cpu int8"
    res = run_interleaved([fp, q], source_images(1), warmup, iters)
    lat = {r.name: summarize(r.samples, 1) for r in (fp, q)}
    acc_fp = auroc_through_runtime(bundle, data, category, threads)
    acc_q = auroc_through_runtime(bundle, data, category, threads, overrides)
    diffs = np.abs(np.array(acc_fp["scores"]) - np.array(acc_q["scores"]))
    return {"kind": "int8", "bundle": str(bundle), "quantized": sorted(overrides), "method":
            "onnxruntime.quantization.quantize_dynamic, weight QInt8, per-tensor", "latency": lat,
            "iters": len(fp.samples), "speedup_p50": round(lat["ort-cpu fp32"]["per_image_ms_p50"]
                                                            / lat["ort-cpu int8"]["per_image_ms_p50"], 3),
            "accuracy": {"data": str(data), "category": category, "fp32": acc_fp, "int8": acc_q,
                         "auroc_cost": round(acc_fp["image_auroc"] - acc_q["image_auroc"], 4),
                         "max_abs_score_diff": round(float(diffs.max()), 5)},
            "scores_seen": len(res["scores"])}


def knob_study(bundle: Path, warmup: int, iters: int, settings: tuple[dict, ...] = KNOB_SETTINGS) -> dict[str, Any]:
    """ORT CPU session knobs on one bundle, all settings interleaved in one loop, batch 1."""
    runners = []
    for s in settings:
        r = make_runner("ort-cpu", bundle, s["threads"], graph_optimization=s["graph_optimization"],
                        enable_mem_arena=s["mem_arena"], bank_search=s.get("bank_search", "onnxruntime"))
        r.name = s["name"]
        runners.append(r)
    run_interleaved(runners, source_images(1), warmup, iters)
    rows = []
    for r in runners:
        summ = summarize(r.samples, 1)
        rows.append({"setting": r.name, "iters": len(r.samples), "end_to_end_ms": summ["end_to_end_ms"],
                     "model_ms_p50": summ.get("model_ms_p50"),
                     "scoring_p50": summ["stages_ms"].get("scoring", {}).get("p50"),
                     "unet_step_p50": [v["p50"] for k, v in summ["stages_ms"].items() if k.startswith("unet_step")]})
    return {"kind": "ort_knobs", "bundle": str(bundle), "rows": rows}


def _opt(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}"


def knobs_markdown(doc: dict[str, Any]) -> str:
    """ORT knobs and int8 results as markdown."""
    lines = [f"# {doc['name']}", "", *stamp_lines(doc["machine"]), "", doc.get("note", ""), ""]
    for r in doc["results"]:
        if r["kind"] == "ort_knobs":
            lines += [f"## ORT CPU knobs — `{r['bundle']}` (batch 1, interleaved)", "",
                      "| setting | iters | e2e p50 ms | p90 | model ms p50 | scoring p50 ms | UNet step p50s |",
                      "|---|---|---|---|---|---|---|"]
            for x in r["rows"]:
                e = x["end_to_end_ms"]
                lines.append(f"| {x['setting']} | {x['iters']} | {e['p50']:.1f} | {e['p90']:.1f} | "
                             f"{x['model_ms_p50']:.1f} | {_opt(x.get('scoring_p50'))} | "
                             f"{', '.join(f'{v:.1f}' for v in x['unet_step_p50'])} |")
        if r["kind"] == "int8":
            a = r["accuracy"]
            lines += [f"## int8 dynamic quantization ({', '.join(r['quantized'])}) — `{r['bundle']}`", "",
                      f"Method: {r['method']}.", "",
                      "| graphs | per image p50 ms | image AUROC (" + f"{a['category']}, {a['fp32']['n']} test images) |",
                      "|---|---|---|",
                      f"| fp32 | {r['latency']['ort-cpu fp32']['per_image_ms_p50']:.1f} | {a['fp32']['image_auroc']:.4f} |",
                      f"| int8 | {r['latency']['ort-cpu int8']['per_image_ms_p50']:.1f} | {a['int8']['image_auroc']:.4f} |",
                      "", f"Speed-up {r['speedup_p50']:.2f}x ({r['iters']} interleaved iterations); AUROC cost "
                      f"{a['auroc_cost']:+.4f}; max |score fp32 - int8| {a['max_abs_score_diff']}.", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Command line of the study."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", type=Path, default=None, help="data root: adds the int8 rows (accuracy on its test set)")
    p.add_argument("--category", default="hazelnut")
    p.add_argument("--name", default=None, help="result file name (default ort_knobs_<profile>)")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    from o2n_edge.runtime.bundle import load_bundle

    set_threads(a.threads)
    name = a.name or f"ort_knobs_{load_bundle(a.bundle).manifest['profile']}"
    doc = {"name": name, "machine": machine_stamp(a.threads),
           "note": "Knob settings run interleaved in one loop; int8 = fp32 vs int8 interleaved, accuracy on "
                   "every test image of the category through the runtime.",
           "results": [knob_study(a.bundle, a.warmup, a.iters)]}
    if a.data:
        doc["results"].append(int8_study(a.bundle, a.data, a.category, a.threads, a.warmup, a.iters))
    write_result(a.out, name, doc, knobs_markdown(doc))
    print(knobs_markdown(doc))


if __name__ == "__main__":
    main()
