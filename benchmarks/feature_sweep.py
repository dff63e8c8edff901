"""Feature sweep (issue 11 pilot): test-set quality of encoder/fusion settings, next to the score
the shots-only self-tuning gives each setting (so the pseudo-validation can be judged).

The test set is encoded once per (network, resolution, tiling) and every layer/kernel/statistics
setting is composed from the cached backbone maps. Each finished (category, setting) is appended
to ``benchmarks/results/<name>.runs.jsonl``; the JSON and markdown table are rewritten each time.

Usage: python -m benchmarks.feature_sweep --only tire,textile --shots 4 --seed 0 \
           --candidates "lite0:224:1:2-4:3:0;lite0:320:1:2-4:3:0" [--name feature_sweep_pilot]
A candidate is kind:size:tiles:layers:kernel:stats_weight (kind lite0|lite1|lite2, layers a-b-c).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from o2n_edge.data import load_dataset, load_image, load_mask, sample_shots
from o2n_edge.metrics import compute_metrics
from o2n_edge.profiles import get_profile
from o2n_edge.tuning.search import Candidate, group_by_encoding

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared" / "data").resolve()
RESULTS = ROOT / "benchmarks" / "results"
SETS = {"textile": ("textile", None), "hazelnut": ("mvtec", SHARED / "hazelnut_toy"), "tire": ("mvtec", SHARED / "mvtec3d_rgb")}
SCORE_BATCH = 16
METRICS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_pro")


def parse_candidate(text: str) -> Candidate:
    kind, size, tiles, layers, kernel, stats = text.strip().split(":")
    return Candidate(f"efficientnet_{kind}", int(size), int(tiles), tuple(int(x) for x in layers.split("-")),
                     int(kernel), float(stats))


def score_test(trunk, cand: Candidate, shot_trunk, n_views: int, k: int, profile, labels, masks,
               coreset: float = 1.0) -> dict:
    from o2n_edge.scoring import ScoringConfig, build_reference, score

    side = trunk.layout.side
    config = replace(ScoringConfig.from_profile(cand.apply(profile), ("pool",)), image_size=side)
    sf = shot_trunk.compose(cand.layers, cand.aggregation)
    shot_feats = [{key: v[i * n_views:(i + 1) * n_views] for key, v in sf.items()} for i in range(k)]
    ref = build_reference(shot_feats, config)
    if coreset < 1.0:
        from o2n_edge.export.coreset import greedy_coreset

        ref.memory_bank = ref.memory_bank[greedy_coreset(ref.memory_bank, coreset, seed=0)]
    scores, maps = [], []
    t = time.perf_counter()
    for s in range(0, len(trunk), SCORE_BATCH):
        feats = trunk.compose(cand.layers, cand.aggregation, slice(s, s + SCORE_BATCH))
        r = score(feats, ref, config)
        scores.append(r.scores)
        if masks is not None:
            maps.append(r.maps.astype(np.float16))
    score_s = time.perf_counter() - t
    m = compute_metrics(labels, np.concatenate(scores), masks,
                        np.concatenate(maps).astype(np.float32) if masks is not None else None)
    return {**{key: m.get(key) for key in METRICS}, "score_s": round(score_s, 1),
            "bank_rows": int(ref.memory_bank.shape[0]), "patch_dim": int(ref.memory_bank.shape[1])}


def write_summary(name: str, records: list[dict]) -> None:
    lines = [f"# {name}\n", "Test-set metrics of each setting (shots-only memory bank) beside its shots-only "
             "pseudo-validation score (leave-one-shot-out + synthetic defects; no test image). Percent.\n",
             "| category | shots | seed | setting | image AUROC | image AP | pixel AUROC | PRO (0.3) | pseudo AUROC | pseudo TPR@0FPR | score s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def pct(x):
        return "—" if x is None else f"{100 * x:.1f}"

    for r in records:
        lines.append(f"| {r['category']} | {r['shots']} | {r['seed']} | {r['candidate']['name']} | {pct(r['image_auroc'])} | "
                     f"{pct(r['image_ap'])} | {pct(r['pixel_auroc'])} | {pct(r['pixel_pro'])} | {pct(r.get('pseudo_auroc'))} | "
                     f"{pct(r.get('pseudo_tpr_at_0fpr'))} | {r['score_s']} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps({"runs": records}, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", default="tire,textile")
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--candidates", required=True)
    ap.add_argument("--name", default="feature_sweep_pilot")
    ap.add_argument("--coreset", type=float, default=1.0, help="keep this fraction of the bank (as export does)")
    ap.add_argument("--no-pixel", action="store_true", help="image metrics only (pixel AUROC/PRO are slow)")
    ap.add_argument("--no-pseudo", action="store_true", help="skip the shots-only pseudo-validation")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from o2n_edge.scoring import augment_views
    from o2n_edge.tuning.features import encode_trunk
    from o2n_edge.tuning.search import pseudo_validate

    profile = get_profile("lite")
    cands = [parse_candidate(c) for c in args.candidates.split(";") if c.strip()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    jsonl = RESULTS / f"{args.name}.runs.jsonl"
    records = [json.loads(x) for x in jsonl.read_text().splitlines()] if jsonl.exists() else []
    done = {(r["category"], r["shots"], r["seed"], r["candidate"]["name"]) for r in records}
    for category in args.only.split(","):
        dataset, root = SETS[category]
        ds = load_dataset(root, dataset, category)
        todo = [c for c in cands if (category, args.shots, args.seed, c.name) not in done]
        if not todo:
            continue
        shot_paths = sample_shots(ds.train_good, args.shots, args.seed)
        raw_shots = [load_image(p) for p in shot_paths]
        pseudo = {}
        if not args.no_pseudo:
            rec = pseudo_validate(raw_shots, todo, profile, seed=args.seed)
            pseudo = {r["candidate"]["name"]: r for r in rec["candidates"]}
            print(f"{category}: pseudo-validation {rec['wall_s']:.0f}s, chosen {rec['chosen']['name']}", flush=True)
        labels = ds.labels
        for group in group_by_encoding(todo).values():
            spec = group[0].encoder_spec(profile.encoder)
            side = spec.input_size
            t = time.perf_counter()
            images = [load_image(s.path, side) for s in ds.test]
            masks = (np.stack([load_mask(s.mask_path, (side, side)) for s in ds.test])
                     if ds.has_masks and not args.no_pixel else None)
            trunk = encode_trunk(spec, images)
            shots = [load_image(p, side) for p in shot_paths]
            views = [v for im in shots for v in augment_views(im)]
            shot_trunk = encode_trunk(spec, views)
            enc_s = time.perf_counter() - t
            del images
            for cand in group:
                res = score_test(trunk, cand, shot_trunk, len(views) // len(shots), len(shots), profile, labels, masks,
                                 args.coreset)
                p = pseudo.get(cand.name, {})
                rec = {"category": category, "shots": args.shots, "seed": args.seed, "candidate": cand.to_dict(), "coreset": args.coreset,
                       **res, "encode_s": round(enc_s, 1), "pseudo_auroc": p.get("pseudo_auroc"),
                       "pseudo_tpr_at_0fpr": p.get("pseudo_tpr_at_0fpr"), "pseudo_per_kind": p.get("per_kind")}
                records.append(rec)
                with jsonl.open("a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                write_summary(args.name, records)
                print(f"{category} {cand.name}: image AUROC {100 * res['image_auroc']:.1f} pseudo "
                      f"{100 * (p.get('pseudo_auroc') or 0):.1f} ({res['score_s']}s)", flush=True)
            del trunk, shot_trunk


if __name__ == "__main__":
    main()
