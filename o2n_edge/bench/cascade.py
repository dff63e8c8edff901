"""Cascade benchmark: latency on a mostly-good stream and the image-AUROC cost of skipping.

Protocol (stated in every result):

1. Every test image (and every held-out good image: the validation goods, else training goods
   that are not the bundle's shots) is scored twice through the runtime: the cheap branches
   (pool/text) and the full pipeline.
2. Two folds: the test set and the held-out goods are split in halves (seeded, stratified). The
   cut-off of fold A is the lowest cheap score of A's anomalies, i.e. the largest cut-off that
   still escalates *every* anomaly of A; it is evaluated on B (and vice versa). The cut-off never
   sees the images it is judged on.
3. On the evaluation half: image AUROC of the full pipeline vs the cascade (skipped images are
   ranked below every escalated one, ordered by their cheap score: the cascade called them
   normal before any full score existed), anomalies skipped, the share of goods skipped; and a
   stream of ``STREAM_LEN`` images resampled with replacement to ``GOOD_FRACTION`` good.
4. Latency is measured live at batch 1: the cascade and the full pipeline alternate on the first
   ``LATENCY_IMAGES`` images of the stream, same threads.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from o2n_edge.bench.env import percentiles

GOOD_FRACTION = 0.95
STREAM_LEN = 2000
LATENCY_IMAGES = 60
SEED = 0
SCORE_BATCH = 8
SKIPPED_OFFSET = 1e9  # skipped images rank below every escalated one
LATENCY_CUT_TARGET = 3.0
AUROC_COST_TARGET = 0.005


def _load(paths: list[Path]) -> list[np.ndarray]:
    from o2n_edge.data import load_image

    return [load_image(p) for p in paths]


def score_all(pipe: Any, cascade: Any, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(cheap scores, full scores) of images through the runtime."""
    cheap, full = [], []
    for i in range(0, len(images), SCORE_BATCH):
        chunk = images[i:i + SCORE_BATCH]
        cheap.append(cascade.cheap_scores(chunk))
        full.append(np.array([r.score for r in pipe.inspect_batch(chunk)]))
    return np.concatenate(cheap), np.concatenate(full)


def cascade_scores(cheap: np.ndarray, full: np.ndarray, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """(ranking scores of the cascade, escalated mask)."""
    esc = cheap >= cutoff
    return np.where(esc, full, cheap - SKIPPED_OFFSET), esc


def _halves(n: int, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    a = np.zeros(n, dtype=bool)
    for lab in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == lab))
        a[idx[: len(idx) // 2 + (len(idx) % 2) * int(rng.integers(0, 2))]] = True
    return a, ~a


def fold_metrics(cheap: np.ndarray, full: np.ndarray, labels: np.ndarray, is_test: np.ndarray,
                 cal: np.ndarray, ev: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    """Calibrate the cut-off on ``cal`` and measure the cascade on ``ev``."""
    from o2n_edge.metrics import image_auroc

    cal_anom = cal & (labels == 1)
    cutoff = float(cheap[cal_anom].min())
    ev_test = ev & is_test
    cs, esc = cascade_scores(cheap, full, cutoff)
    good_ev = ev & (labels == 0)
    anom_ev = ev & (labels == 1)
    out = {
        "cutoff": cutoff,
        "calibration": {"anomalies": int(cal_anom.sum()), "goods": int((cal & (labels == 0)).sum())},
        "evaluation": {"test_images": int(ev_test.sum()), "goods_incl_heldout": int(good_ev.sum()),
                       "anomalies": int(anom_ev.sum())},
        "goods_skipped_share": round(float((~esc[good_ev]).mean()), 4),
        "anomalies_skipped": int((~esc[anom_ev]).sum()),
        "auroc_full_test": round(image_auroc(labels[ev_test], full[ev_test]), 4),
        "auroc_cascade_test": round(image_auroc(labels[ev_test], cs[ev_test]), 4),
        "auroc_cheap_only_test": round(image_auroc(labels[ev_test], cheap[ev_test]), 4),
    }
    goods, anoms = np.flatnonzero(good_ev), np.flatnonzero(anom_ev)
    n_anom = int(round(STREAM_LEN * (1 - GOOD_FRACTION)))
    stream = np.concatenate([rng.choice(goods, STREAM_LEN - n_anom), rng.choice(anoms, n_anom)])
    stream = rng.permutation(stream)
    out["stream"] = {"length": STREAM_LEN, "good_fraction": GOOD_FRACTION,
                     "escalated_share": round(float(esc[stream].mean()), 4),
                     "auroc_full": round(image_auroc(labels[stream], full[stream]), 4),
                     "auroc_cascade": round(image_auroc(labels[stream], cs[stream]), 4)}
    out["stream"]["auroc_cost"] = round(out["stream"]["auroc_full"] - out["stream"]["auroc_cascade"], 4)
    out["_stream_idx"] = stream
    return out


def measure_stream_latency(pipe: Any, cascade: Any, images: list[np.ndarray], stream: np.ndarray,
                           n: int = LATENCY_IMAGES) -> dict[str, Any]:
    """Mean / p50 / p90 latency of the cascade and the full pipeline, alternating, batch 1."""
    casc_ms, full_ms = [], []
    cascade.inspect(images[int(stream[0])])
    pipe.inspect(images[int(stream[0])])
    escalated = 0
    for i in stream[:n]:
        img = images[int(i)]
        t0 = time.perf_counter()
        cascade.inspect(img)
        casc_ms.append((time.perf_counter() - t0) * 1000.0)
        escalated += int(cascade.last_escalated[0])
        t0 = time.perf_counter()
        pipe.inspect(img)
        full_ms.append((time.perf_counter() - t0) * 1000.0)
    c, f = percentiles(casc_ms), percentiles(full_ms)
    return {"images": len(casc_ms), "escalated": escalated, "cascade_ms": c, "full_ms": f,
            "mean_latency_cut": round(f["mean"] / c["mean"], 3)}


def cascade_study(bundle: Path, data: Path | None, category: str, threads: int, seed: int = SEED,
                  latency_images: int = LATENCY_IMAGES, dataset: str | None = None) -> dict[str, Any]:
    """The whole protocol for one bundle and its data set; returns the result dict.

    ``data``/``dataset``: as for :func:`o2n_edge.data.load_dataset` (``None``/``"textile"`` = the built-in set).
    """
    from o2n_edge.bench.latency import ort_session_options
    from o2n_edge.data import load_dataset
    from o2n_edge.runtime.cascade import CascadePipeline
    from o2n_edge.runtime.pipeline import OrtPipeline

    t_start = time.perf_counter()
    pipe = OrtPipeline(bundle, ort_session_options(threads))
    cascade = CascadePipeline(pipe, skip_below=float("inf"))
    m = pipe.manifest
    ds = load_dataset(data, dataset, category)
    shots = set(m["shots"]["images"])
    held = list(ds.val_good) if ds.val_good else [p for p in ds.train_good if p.name not in shots]
    paths = [s.path for s in ds.test] + held
    labels = np.array([s.label for s in ds.test] + [0] * len(held))
    is_test = np.array([True] * len(ds.test) + [False] * len(held))
    images = _load(paths)
    cheap, full = score_all(pipe, cascade, images)
    rng = np.random.default_rng(seed)
    strata = labels * 2 + is_test  # split test goods, anomalies and held-out goods separately
    a, b = _halves(len(paths), strata, rng)
    folds = [fold_metrics(cheap, full, labels, is_test, a, b, rng), fold_metrics(cheap, full, labels, is_test, b, a, rng)]
    cascade.skip_below = folds[0]["cutoff"]
    lat = measure_stream_latency(pipe, cascade, images, folds[0]["_stream_idx"], latency_images)
    for f in folds:
        f.pop("_stream_idx")
    cost = max(f["stream"]["auroc_cost"] for f in folds)
    return {
        "kind": "cascade", "bundle": str(bundle), "profile": m["profile"], "category": category,
        "data": str(data) if data else dataset, "seed": seed, "cheap_branches": list(cascade.cheap.params.branches),
        "images": {"test": int(is_test.sum()), "heldout_goods": len(held), "anomalies": int(labels.sum())},
        "folds": folds, "latency_fold0": lat,
        "targets": [
            {"target": f"cascade mean latency cut >= {LATENCY_CUT_TARGET}x on a {100 * GOOD_FRACTION:.0f}%-good stream",
             "measured": f"{lat['mean_latency_cut']:.2f}x", "met": lat["mean_latency_cut"] >= LATENCY_CUT_TARGET},
            {"target": f"image-AUROC cost <= {AUROC_COST_TARGET} (worst fold, stream)",
             "measured": f"{cost:.4f}", "met": cost <= AUROC_COST_TARGET},
        ],
        "wall_s": round(time.perf_counter() - t_start, 1),
    }


def cascade_markdown(doc: dict[str, Any]) -> str:
    """The cascade result as markdown."""
    from o2n_edge.bench.report import stamp_lines

    lines = [f"# {doc['name']}", "", *stamp_lines(doc["machine"]), "", doc.get("protocol", ""), ""]
    for r in doc["results"]:
        lat = r["latency_fold0"]
        lines += [f"## {r['profile']} — {r['category']}", "",
                  f"Cheap branches: {', '.join(r['cheap_branches'])}; images: {r['images']}.", "",
                  "| fold | cut-off | goods skipped | anomalies skipped (eval) | AUROC full (test half) | "
                  "AUROC cascade | AUROC cheap only | stream escalated | stream AUROC full | stream AUROC cascade | cost |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for i, f in enumerate(r["folds"]):
            s = f["stream"]
            lines.append(f"| {i} | {f['cutoff']:.4f} | {100 * f['goods_skipped_share']:.1f}% | "
                         f"{f['anomalies_skipped']}/{f['evaluation']['anomalies']} | {f['auroc_full_test']:.4f} | "
                         f"{f['auroc_cascade_test']:.4f} | {f['auroc_cheap_only_test']:.4f} | "
                         f"{100 * s['escalated_share']:.1f}% | {s['auroc_full']:.4f} | {s['auroc_cascade']:.4f} | "
                         f"{s['auroc_cost']:+.4f} |")
        lines += ["", f"Live latency, batch 1, {lat['images']} stream images ({lat['escalated']} escalated): "
                  f"cascade mean {lat['cascade_ms']['mean']:.1f} ms (p50 {lat['cascade_ms']['p50']:.1f}), full "
                  f"mean {lat['full_ms']['mean']:.1f} ms (p50 {lat['full_ms']['p50']:.1f}): "
                  f"**{lat['mean_latency_cut']:.2f}x** mean latency cut.", ""]
        lines += ["| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |" for t in r["targets"]]
        lines.append("")
    return "\n".join(lines) + "\n"
