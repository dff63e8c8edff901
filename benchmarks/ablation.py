"""Ablation of the One-to-Normal branches (issue 3): shots-only bank vs + pool vs + personalized vs all.

One personalized run per (data set, shots, seed), shared by the four variants: the run's
generated pool and the normal versions of the test images are computed once and reused, so the
variants differ only in what the scoring sees. Every finished (data set, shots, seed) is appended
to ``benchmarks/results/<name>.runs.jsonl`` at once, so an interrupted ablation resumes where it
stopped; the summary JSON and markdown table are rewritten from that file after every run.

Usage: python -m benchmarks.ablation [--profile lite] [--personalize-steps N] [--distill-steps N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from o2n_edge.data import load_dataset, load_image, load_mask, sample_shots
from o2n_edge.data.preprocess import resize_uint8
from o2n_edge.metrics import compute_metrics, mean_std
from o2n_edge.profiles import get_profile
from o2n_edge.scoring import ScoringConfig, augment_views, build_reference, score

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared" / "data").resolve()
RESULTS = ROOT / "benchmarks" / "results"
SETS = [("textile", None, "textile"), ("mvtec", SHARED / "hazelnut_toy", "hazelnut"), ("mvtec", SHARED / "mvtec3d_rgb", "tire")]
VARIANTS = {  # name -> (branches, use generated pool)
    "shots-only": (("pool",), False),
    "+pool": (("pool",), True),
    "+personalized": (("personalized", "pool"), False),
    "all": (("personalized", "pool"), True),
}
METRICS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_pro")
SCORE_BATCH = 32


def _batched_scores(feats, reference, config, normal_feats):
    scores, maps = [], []
    n = len(feats["patch"])
    for s in range(0, n, SCORE_BATCH):
        sl = slice(s, s + SCORE_BATCH)
        nf = None if normal_feats is None else {k: v[sl] for k, v in normal_feats.items()}
        r = score({k: v[sl] for k, v in feats.items()}, reference, config, nf)
        scores.append(r.scores)
        maps.append(r.maps)
    return np.concatenate(scores), np.concatenate(maps)


def run_one(ds, profile, encoder, test_cache, k, seed, runs_dir, p_steps, d_steps) -> dict:
    from o2n_edge.diffusion import generate_pool, load_run, one_to_normal
    from o2n_edge.encoders import encode_images
    from o2n_edge.personalized_eval import ensure_run, run_name

    size = encoder.image_size
    t0 = time.perf_counter()
    shot_paths = sample_shots(ds.train_good, k, seed)
    run_dir = runs_dir / run_name(ds, profile, k, seed)
    times = ensure_run(shot_paths, ds.category, profile, run_dir, seed, progress=False,
                       personalize_steps=p_steps, distill_steps=d_steps)
    run = load_run(run_dir, device="cpu")
    t = time.perf_counter()
    pool = generate_pool(run, profile.diffusion.pool_size, seed=seed, progress=False)
    times["pool_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    images, labels, masks, test_feats = test_cache
    normals = resize_uint8(one_to_normal(run, images, seed=seed).normals, size)
    normal_feats = encode_images(encoder, normals)
    shot_imgs = [load_image(p, size) for p in shot_paths]
    shot_normal = encode_images(encoder, resize_uint8(one_to_normal(run, np.stack(shot_imgs), seed=seed).normals, size))
    times["transform_s"] = round(time.perf_counter() - t, 2)
    shot_feats = [encode_images(encoder, augment_views(im)) for im in shot_imgs]
    pool_feats = encode_images(encoder, resize_uint8(pool, size))
    rec = {"dataset": ds.name, "category": ds.category, "shots": k, "seed": seed,
           "transform": {"strength": run.spec.strength, "steps": run.spec.steps},
           "shot_images": [p.name for p in shot_paths], "pool_size": int(len(pool)),
           "distill": run.distill_info.get("distances", {}), **times, "variants": {}}
    for name, (branches, use_pool) in VARIANTS.items():
        config = ScoringConfig.from_profile(profile, branches)
        ref = build_reference(shot_feats, config, None, pool_feats if use_pool else None,
                              shot_normal if "personalized" in branches else None)
        s, maps = _batched_scores(test_feats, ref, config, normal_feats if "personalized" in branches else None)
        rec["variants"][name] = compute_metrics(labels, s, masks, maps if masks is not None else None)
    rec["wall_s"] = round(time.perf_counter() - t0, 2)
    return rec


def transform_settings(rec: dict, runs_dir: Path) -> str:
    """'strength/steps' the run's transform actually used (from the record, else the run's run.json)."""
    t = rec.get("transform")
    if t is None:

        name = f"{rec['dataset']}-{rec['category']}-{rec['settings']['profile']}-k{rec['shots']}-s{rec['seed']}"
        try:
            spec = json.loads((runs_dir / name / "run.json").read_text())["spec"]
            t = {"strength": spec["strength"], "steps": spec["steps"]}
        except (OSError, KeyError, ValueError):
            return "?"
    return f"{t['strength']}/{t['steps']}"


def _stage_wall(rec: dict, key: str, json_name: str, runs_dir: Path) -> float:
    """Wall seconds of a stage: from the record, else from the cached run's own json (its wall_s)."""
    if key in rec:
        return float(rec[key])
    name = f"{rec['dataset']}-{rec['category']}-{rec['settings']['profile']}-k{rec['shots']}-s{rec['seed']}"
    try:
        return float(json.loads((runs_dir / name / json_name).read_text())["wall_s"])
    except (OSError, KeyError, ValueError):
        return float("nan")


def summarize(records: list[dict], runs_dir: Path = Path("runs/ablation")) -> tuple[list[dict], str]:
    rows = []
    keys = sorted({(r["category"], r["shots"]) for r in records}, key=lambda x: ([c for _, _, c in SETS].index(x[0]), x[1]))
    lines = ["| data set | shots | seeds | strength/steps | variant | image AUROC | image AP | pixel AUROC | PRO (0.3) | personalize s | distill s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for cat, k in keys:
        group = [r for r in records if r["category"] == cat and r["shots"] == k]
        seeds = ",".join(str(r["seed"]) for r in sorted(group, key=lambda r: r["seed"]))
        settings = ",".join(sorted({transform_settings(r, runs_dir) for r in group}))
        for v in VARIANTS:
            row = {"category": cat, "shots": k, "seeds": seeds, "variant": v}
            cells = []
            for m in METRICS:
                vals = [r["variants"][v][m] for r in group if r["variants"][v].get(m) is not None]
                if vals:
                    mu, sd = mean_std(vals)
                    row[m] = {"mean": mu, "std": sd}
                    cells.append(f"{100 * mu:.1f} ± {100 * sd:.1f}")
                else:
                    row[m] = None
                    cells.append("—")
            ps = np.mean([_stage_wall(r, "personalize_s", "run.json", runs_dir) for r in group])
            dsec = np.mean([_stage_wall(r, "distill_s", "distill.json", runs_dir) for r in group])
            lines.append(f"| {cat} | {k} | {seeds} | {settings} | {v} | " + " | ".join(cells) + f" | {ps:.0f} | {dsec:.0f} |")
            rows.append(row)
    return rows, "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--profile", default="lite")
    ap.add_argument("--shots", default="1,2,4")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--only", default=None)
    ap.add_argument("--personalize-steps", type=int, default=None)
    ap.add_argument("--distill-steps", type=int, default=None)
    ap.add_argument("--runs-dir", default="runs/ablation")
    ap.add_argument("--name", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--summarize-only", action="store_true", help="rebuild the table from the .runs.jsonl")
    args = ap.parse_args()
    if args.summarize_only:
        name = args.name or f"ablation_{args.profile}"
        records = [json.loads(x) for x in (RESULTS / f"{name}.runs.jsonl").read_text().splitlines()]
        rows, md = summarize(records, Path(args.runs_dir))
        (RESULTS / f"{name}.json").write_text(json.dumps({"rows": rows, "runs": records}, indent=2) + "\n")
        (RESULTS / f"{name}.md").write_text(f"# {name}\n\nImage AUROC etc. in percent, mean ± std over seeds; "
                                             f"settings per run in {name}.runs.jsonl.\n\n" + md)
        print(md)
        return
    import torch

    torch.set_num_threads(args.threads)
    from o2n_edge.encoders import build_encoder, encode_images

    profile = get_profile(args.profile)
    name = args.name or f"ablation_{args.profile}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    jsonl = RESULTS / f"{name}.runs.jsonl"
    done = {(r["category"], r["shots"], r["seed"]) for r in map(json.loads, jsonl.read_text().splitlines())} if jsonl.exists() else set()
    encoder = build_encoder(profile.encoder)
    size = encoder.image_size
    for dataset, root, category in SETS:
        if args.only and category not in args.only.split(","):
            continue
        ds = load_dataset(root, dataset, category)
        todo = [(k, s) for k in map(int, args.shots.split(",")) for s in map(int, args.seeds.split(",")) if (category, k, s) not in done]
        if not todo:
            continue
        images = np.stack([load_image(x.path, size) for x in ds.test])
        masks = np.stack([load_mask(x.mask_path, (size, size)) for x in ds.test]) if ds.has_masks else None
        test_cache = (images, ds.labels, masks, encode_images(encoder, images))
        for k, seed in todo:
            rec = run_one(ds, profile, encoder, test_cache, k, seed, Path(args.runs_dir), args.personalize_steps, args.distill_steps)
            rec["settings"] = {"profile": profile.name, "personalize_steps": args.personalize_steps or profile.diffusion.personalize_steps,
                               "distill_steps": args.distill_steps or profile.diffusion.distill_steps,
                               "strength": profile.diffusion.strength, "steps": profile.diffusion.steps,
                               "pool_size": profile.diffusion.pool_size, "threads": args.threads}
            with jsonl.open("a") as fh:
                fh.write(json.dumps(rec) + "\n")
            print(f"{category} k={k} seed={seed}: " + ", ".join(f"{v} {100 * m['image_auroc']:.1f}" for v, m in rec["variants"].items())
                  + f" ({rec['wall_s']:.0f}s)", flush=True)
            records = [json.loads(x) for x in jsonl.read_text().splitlines()]
            rows, md = summarize(records, Path(args.runs_dir))
            (RESULTS / f"{name}.json").write_text(json.dumps({"rows": rows, "runs": records}, indent=2) + "\n")
            (RESULTS / f"{name}.md").write_text(f"# {name}\n\nImage AUROC etc. in percent, mean ± std over seeds; "
                                                 f"settings per run in {name}.runs.jsonl.\n\n" + md)


if __name__ == "__main__":
    main()
