"""Accuracy cost of the speed options, measured through the runtime on real test sets.

Each speed option changes what is computed: fp16 graphs and int8 weights change every feature
distance a little, a coreset drops rows of the memory bank. Whether that costs detection is a
question for real images, not for a latency table, so every variant of one personalized run
scores the same test set through the same runtime and is compared with the fp32, full-bank
export of that run: image AUROC, pixel AUROC (where the set has masks), and the largest
per-image score change. Per-image latency from the same pass (batch 1) is reported next to it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from o2n_edge.bench.env import percentiles


@dataclass
class Variant:
    """One way to run a personalized run: a bundle, optionally with graphs swapped (int8)."""

    name: str
    bundle: Path
    overrides: dict[str, Path] = field(default_factory=dict)


def score_test_set(variant: Variant, images: list[np.ndarray], threads: int) -> dict[str, Any]:
    """Scores and maps of every image at batch 1, and the per-image latencies of that pass."""
    from o2n_edge.bench.latency import open_ort

    pipe, _ = open_ort(variant.bundle, threads, overrides=variant.overrides or None)
    scores, maps, ms = [], [], []
    for img in images:
        t0 = time.perf_counter()
        r = pipe.inspect(img)
        ms.append((time.perf_counter() - t0) * 1000.0)
        scores.append(r.score)
        maps.append(r.anomaly_map)
    m = pipe.manifest
    return {"scores": np.array(scores), "maps": np.stack(maps), "latency_ms": percentiles(ms),
            "precision": m["precision"], "bank_rows": int(m["memory_bank"]["rows"]),
            "graphs_swapped": sorted(variant.overrides), "providers": list(pipe.providers)}


def variants_study(variants: list[Variant], data: Path | None, dataset: str | None, category: str,
                   threads: int) -> dict[str, Any]:
    """All variants on one test set; the first variant is the reference the costs are taken from."""
    from o2n_edge.data import load_dataset, load_image, load_mask
    from o2n_edge.metrics import image_auroc, pixel_auroc

    t_start = time.perf_counter()
    ds = load_dataset(data, dataset, category)
    images = [load_image(s.path) for s in ds.test]
    labels = ds.labels
    rows: list[dict[str, Any]] = []
    masks = None
    for v in variants:
        out = score_test_set(v, images, threads)
        if masks is None and ds.has_masks:
            size = out["maps"].shape[-1]
            masks = np.stack([load_mask(s.mask_path, (size, size)) for s in ds.test])
        row = {"variant": v.name, "bundle": str(v.bundle), "precision": out["precision"],
               "bank_rows": out["bank_rows"], "graphs_swapped": out["graphs_swapped"],
               "image_auroc": round(image_auroc(labels, out["scores"]), 4),
               "pixel_auroc": round(pixel_auroc(masks, out["maps"]), 4) if masks is not None else None,
               "latency_ms": out["latency_ms"], "scores": [round(float(x), 5) for x in out["scores"]]}
        if rows:
            ref = rows[0]
            row["image_auroc_cost"] = round(ref["image_auroc"] - row["image_auroc"], 4)
            if masks is not None:
                row["pixel_auroc_cost"] = round(ref["pixel_auroc"] - row["pixel_auroc"], 4)
            row["max_abs_score_diff"] = round(float(np.abs(out["scores"] - np.array(ref["scores"])).max()), 5)
        rows.append(row)
    return {"kind": "variants", "category": category, "data": str(data) if data else dataset,
            "test_images": len(images), "anomalies": int(labels.sum()), "has_masks": bool(ds.has_masks),
            "reference": variants[0].name, "rows": rows, "wall_s": round(time.perf_counter() - t_start, 1)}


def variants_markdown(doc: dict[str, Any]) -> str:
    """One table per test set: accuracy and its cost next to the latency of each variant."""
    from o2n_edge.bench.report import stamp_lines

    lines = [f"# {doc['name']}", "", *stamp_lines(doc["machine"]), "", " ".join(__doc__.split()), ""]
    if doc.get("note"):
        lines += [doc["note"], ""]
    for r in doc["results"]:
        lines += [f"## {r['category']} — {r['test_images']} test images ({r['anomalies']} anomalous), "
                  f"reference: {r['reference']}", "",
                  "| variant | graphs | bank rows | image AUROC | cost | pixel AUROC | cost | max \\|Δscore\\| | "
                  "per-image p50 ms | p90 |", "|---|---|---|---|---|---|---|---|---|---|"]
        for x in r["rows"]:
            graphs = x["precision"] + (f" ({', '.join(x['graphs_swapped'])} int8)" if x["graphs_swapped"] else "")
            pix = f"{x['pixel_auroc']:.4f}" if x["pixel_auroc"] is not None else "—"
            cost = f"{x['image_auroc_cost']:+.4f}" if "image_auroc_cost" in x else "—"
            pcost = f"{x['pixel_auroc_cost']:+.4f}" if "pixel_auroc_cost" in x else "—"
            diff = f"{x['max_abs_score_diff']:.4f}" if "max_abs_score_diff" in x else "—"
            lines.append(f"| {x['variant']} | {graphs} | {x['bank_rows']} | {x['image_auroc']:.4f} | {cost} | {pix} | "
                         f"{pcost} | {diff} | {x['latency_ms']['p50']:.1f} | {x['latency_ms']['p90']:.1f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


__all__ = ["Variant", "score_test_set", "variants_markdown", "variants_study"]
