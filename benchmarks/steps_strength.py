"""Fewer steps / lower strength vs image AUROC (issue 6): the transform's cost/accuracy trade-off.

For one personalized run, every (strength, steps) pair re-runs the one-to-normal transform on the
test set and scores the personalized + pool branches (torch reference). The transform's cost is
linear in the steps (one UNet call each), so the chart says how few steps the accuracy allows.
Writes benchmarks/results/<name>.{json,md,png}.

Usage: python -m benchmarks.steps_strength --run runs/ablation/mvtec-hazelnut-lite-k1-s0 --data ../shared/data/hazelnut_toy --category hazelnut --shots 1 --seed 0
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from o2n_edge.data import load_dataset, load_image, sample_shots
from o2n_edge.data.preprocess import resize_uint8
from o2n_edge.metrics import image_auroc
from o2n_edge.profiles import get_profile
from o2n_edge.scoring import ScoringConfig, augment_views, build_reference, score

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
STRENGTHS = (0.1, 0.2, 0.3, 0.5, 0.7)
STEPS = (1, 2, 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--category", required=True)
    ap.add_argument("--shots", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", default="lite")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from o2n_edge.diffusion import load_run, one_to_normal
    from o2n_edge.encoders import build_encoder, encode_images

    profile = get_profile(args.profile)
    encoder = build_encoder(profile.encoder)
    size = encoder.image_size
    ds = load_dataset(args.data, args.dataset, args.category)
    run = load_run(args.run, device="cpu")
    shots = [load_image(p, size) for p in sample_shots(ds.train_good, args.shots, args.seed)]
    images = np.stack([load_image(s.path, size) for s in ds.test])
    feats = encode_images(encoder, images)
    shot_feats = [encode_images(encoder, augment_views(im)) for im in shots]
    config = ScoringConfig.from_profile(profile, ("personalized", "pool"))
    base = build_reference(shot_feats, ScoringConfig.from_profile(profile, ("pool",)))
    pool_only = image_auroc(ds.labels, score(feats, base, ScoringConfig.from_profile(profile, ("pool",))).scores)
    rows = []
    for strength in STRENGTHS:
        for steps in STEPS:
            t = time.perf_counter()
            res = one_to_normal(run, images, strength=strength, steps=steps, seed=args.seed)
            transform_s = (time.perf_counter() - t) / len(images)
            normals = encode_images(encoder, resize_uint8(res.normals, size))
            shot_n = encode_images(encoder, resize_uint8(one_to_normal(run, np.stack(shots), strength=strength, steps=steps, seed=args.seed).normals, size))
            ref = build_reference(shot_feats, config, None, None, shot_n)
            auroc = image_auroc(ds.labels, score(feats, ref, config, normals).scores)
            rows.append({"strength": strength, "steps": steps, "steps_run": res.steps_run,
                         "image_auroc": auroc, "transform_ms_per_image": 1000 * transform_s})
            print(f"strength {strength} steps {steps}: AUROC {100 * auroc:.1f} ({1000 * transform_s:.1f} ms/img)", flush=True)
    name = args.name or f"steps_strength_{args.category}_{args.profile}"
    doc = {"run": str(args.run), "category": args.category, "shots": args.shots, "seed": args.seed,
           "branches": list(config.branches), "pool_only_auroc": pool_only, "rows": rows,
           "note": "torch reference, 1 thread, shared 2-core machine; ms/img includes VAE encode/decode"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    md = [f"# {name}\n", f"Run `{args.run}` ({args.shots} shot(s), seed {args.seed}); branches personalized + pool; "
          f"pool branch alone: {100 * pool_only:.1f}.\n", "| strength | steps | image AUROC | transform ms/image |", "|---|---|---|---|"]
    md += [f"| {r['strength']} | {r['steps']} | {100 * r['image_auroc']:.1f} | {r['transform_ms_per_image']:.1f} |" for r in rows]
    (RESULTS / f"{name}.md").write_text("\n".join(md) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for steps in STEPS:
        sel = [r for r in rows if r["steps"] == steps]
        ax.plot([r["strength"] for r in sel], [100 * r["image_auroc"] for r in sel], marker="o", label=f"{steps} step(s)")
    ax.axhline(100 * pool_only, color="gray", ls="--", label="pool branch only")
    ax.set_xlabel("strength")
    ax.set_ylabel("image AUROC (%)")
    ax.set_title(f"{args.category}: transform strength/steps vs AUROC")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=100)
    print("\n".join(md))


if __name__ == "__main__":
    main()
