"""int8 dynamic quantization of a bundle's UNet and image encoder, and ORT CPU knobs.

Why dynamic quantization: it needs no calibration set (weights int8, activations quantized on
the fly per batch), so it is the cheapest thing to try on a CPU line device. Why measure
accuracy: int8 noise in the UNet changes the normal version and in the encoder changes every
feature distance, so the image AUROC through the runtime on real images (fp32 vs int8, same
images, same bundle constants) is reported next to the speed. The quantized graphs live in a
cache dir (never committed); the bundle itself is not modified.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np

CACHE_DIR = Path(".bench_cache") / "int8"
QUANTIZED = ("unet", "image_encoder")
KNOB_SETTINGS = (
    {"name": "threads=1, opt=all, arena=on", "threads": 1, "graph_optimization": "all", "mem_arena": True},
    {"name": "threads=2, opt=all, arena=on", "threads": 2, "graph_optimization": "all", "mem_arena": True},
    {"name": "threads=1, opt=basic, arena=on", "threads": 1, "graph_optimization": "basic", "mem_arena": True},
    {"name": "threads=1, opt=all, arena=off", "threads": 1, "graph_optimization": "all", "mem_arena": False},
    {"name": "threads=1, opt=all, arena=on, bank search numpy", "threads": 1, "graph_optimization": "all",
     "mem_arena": True, "bank_search": "numpy"},
)


def quantized_overrides(bundle: Path, names: tuple[str, ...] = QUANTIZED, cache_dir: Path = CACHE_DIR) -> dict[str, Path]:
    """Quantize (once, cached by the bundle's manifest hash) and return name -> int8 graph path."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from o2n_edge.runtime.bundle import load_bundle

    b = load_bundle(bundle)
    key = hashlib.sha256(str(b.manifest["manifest_sha256"]).encode()).hexdigest()[:16]
    out = {}
    for name in names:
        if name not in b.manifest["models"]:
            continue
        dst = (cache_dir / key / f"{name}.int8.onnx").resolve()
        if not dst.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(dst.name + ".tmp.onnx")
            quantize_dynamic(str(b.model_path(name)), str(tmp), weight_type=QuantType.QInt8)
            tmp.replace(dst)
        out[name] = dst
    return out


def auroc_through_runtime(bundle: Path, data: Path, category: str, threads: int,
                          overrides: dict[str, Path] | None = None) -> dict[str, Any]:
    """Image AUROC of the runtime on the category's test set (optionally with swapped graphs)."""
    from o2n_edge.bench.variants import Variant, score_test_set
    from o2n_edge.data import load_dataset, load_image
    from o2n_edge.metrics import image_auroc

    ds = load_dataset(data, None, category)
    t0 = time.perf_counter()
    out = score_test_set(Variant("", bundle, dict(overrides or {})), [load_image(s.path) for s in ds.test], threads)
    scores = out["scores"]
    return {"image_auroc": round(image_auroc(ds.labels, scores), 4), "n": len(scores),
            "scores": [round(float(x), 5) for x in scores], "wall_s": round(time.perf_counter() - t0, 1)}


def int8_study(bundle: Path, data: Path, category: str, threads: int, warmup: int, iters: int) -> dict[str, Any]:
    """fp32 vs int8 (UNet + encoder): per-image latency side by side and image AUROC on real data."""
    from o2n_edge.bench.latency import make_runner, run_interleaved, source_images, summarize

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
    from o2n_edge.bench.latency import make_runner, run_interleaved, source_images, summarize

    runners = []
    for s in settings:
        r = make_runner("ort-cpu", bundle, s["threads"], graph_optimization=s["graph_optimization"],
                        mem_arena=s["mem_arena"], bank_search=s.get("bank_search", "onnxruntime"))
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
    from o2n_edge.bench.report import stamp_lines

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


__all__ = ["auroc_through_runtime", "int8_study", "knob_study", "quantized_overrides"]
