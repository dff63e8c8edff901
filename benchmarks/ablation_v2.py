"""Lite One-to-Normal ablation, v2 (issue 10): TAEF2 latents + local denoiser, three comparisons.

Runs ``o2n_edge.bench.ablation_lite`` over data sets x shots x seeds x training configs; every
finished run is appended to ``benchmarks/results/<name>.runs.jsonl`` at once (an interrupted run
resumes), and ``<name>.json`` / ``<name>.md`` are rebuilt from it after every run.

Usage:
  python -m benchmarks.ablation_v2 --only tire,textile --shots 4 --seeds 0 \
      --configs 0.3:600:2,0.3:600:0 --name ablation_lite_pilot          # the pilot
  python -m benchmarks.ablation_v2 --configs 0.3:300:2 --name ablation_lite_v2   # the grid
A config is strength:steps:keep_low_sigma (personalization steps; keep_low 0 = off).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from o2n_edge.bench.ablation_lite import COMPARISONS, TestCache, TrainConfig, run_one, summarize, verdict

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared" / "data").resolve()
RESULTS = ROOT / "benchmarks" / "results"
SETS = [("mvtec", SHARED / "hazelnut_toy", "hazelnut"), ("mvtec", SHARED / "mvtec3d_rgb", "tire"),
        ("textile", None, "textile")]
ORDER = [c for _, _, c in SETS]


def parse_config(text: str) -> TrainConfig:
    try:
        s, n, lo = text.split(":")
        return TrainConfig(strength=float(s), steps=int(n), keep_low_sigma=float(lo))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"config {text!r}: expected strength:steps:keep_low_sigma") from exc


def write_summary(name: str, jsonl: Path | list[Path], header: str) -> str:
    files = jsonl if isinstance(jsonl, list) else [jsonl]
    records, seen = [], set()
    for f in files:
        for x in f.read_text().splitlines() if f.exists() else []:
            r = json.loads(x) if x.strip() else None
            key = r and (r["config"], r["category"], r["shots"], r["seed"])
            if r and key not in seen:  # parallel processes could finish the same run twice: first wins
                seen.add(key)
                records.append(r)
    rows, md = summarize(records, ORDER)
    decision, vmd = verdict(rows)
    (RESULTS / f"{name}.json").write_text(json.dumps({"rows": rows, "verdict": decision, "runs": records}, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(f"# {name}\n\n{header}\n\n" + md + "\n## Verdict\n\n" + vmd)
    return md + "\n" + vmd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help="comma list of categories (hazelnut,tire,textile)")
    ap.add_argument("--shots", default="1,2,4")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--configs", default="0.3:600:2", help="comma list of strength:steps:keep_low_sigma")
    ap.add_argument("--runs-dir", default="runs/ablation_v2")
    ap.add_argument("--cache-dir", default=".bench_cache/ablation_v2")
    ap.add_argument("--name", default="ablation_lite_v2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--coreset", type=float, default=0.1,
                    help="fraction of each memory bank kept (lite export default 0.1; 1 = whole bank)")
    ap.add_argument("--comparisons", default=",".join(COMPARISONS),
                    help="personalized-branch comparisons to score (query, recon, latent)")
    ap.add_argument("--summarize-only", action="store_true")
    ap.add_argument("--merge", default=None, help="with --summarize-only: comma list of run names to merge into --name")
    args = ap.parse_args()
    configs = [parse_config(c) for c in args.configs.split(",")]
    comparisons = tuple(c for c in args.comparisons.split(",") if c)
    unknown = set(comparisons) - set(COMPARISONS)
    if unknown:
        ap.error(f"unknown comparison(s) {sorted(unknown)}: choose from {', '.join(COMPARISONS)}")
    header = (f"`python -m benchmarks.ablation_v2 --shots {args.shots} --seeds {args.seeds} --configs {args.configs}"
              f"{' --only ' + args.only if args.only else ''} --coreset {args.coreset:g} --comparisons {args.comparisons} "
              f"--name {args.name}` (1 thread; memory "
              f"banks: greedy k-center coreset {args.coreset:g} of the shots' and of the pool's patches, as the lite export). Percent, mean ± std "
              "over seeds. config = s<strength>-n<personalization steps>-lo<keep_low_sigma>; every run's shots, "
              "settings and wall times are in the .runs.jsonl. +personalized/<cmp>: query = query vs its normal "
              "version, recon = the query's TAEF2 reconstruction vs its normal version, latent = standardized "
              "latent residual. all = personalized + pool with the generated pool.")
    RESULTS.mkdir(parents=True, exist_ok=True)
    jsonl = RESULTS / f"{args.name}.runs.jsonl"
    if args.summarize_only:
        parts = [RESULTS / f"{n}.runs.jsonl" for n in args.merge.split(",")] if args.merge else [jsonl]
        if args.merge:
            header += f" Merged from {', '.join(p.name for p in parts)} (run in parallel, one thread each)."
        print(write_summary(args.name, parts, header))
        return
    import subprocess

    import torch

    # every module a run needs, imported now: the tree may change (merges) while a long grid runs
    import o2n_edge.bench.ablation_lite  # noqa: F401
    import o2n_edge.diffusion.lite  # noqa: F401
    import o2n_edge.diffusion.personalize  # noqa: F401
    import o2n_edge.diffusion.pool  # noqa: F401
    import o2n_edge.diffusion.transform  # noqa: F401
    import o2n_edge.export.coreset  # noqa: F401
    import o2n_edge.metrics  # noqa: F401
    import o2n_edge.scoring  # noqa: F401

    torch.set_num_threads(args.threads)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    from o2n_edge.data import load_dataset
    from o2n_edge.diffusion.taef2 import SCALING_FACTOR, load_taef2
    from o2n_edge.encoders import build_encoder
    from o2n_edge.profiles import get_profile

    profile = get_profile("lite")
    encoder = build_encoder(profile.encoder)
    vae = load_taef2()
    done = set()
    if jsonl.exists():
        done = {(r["config"], r["category"], r["shots"], r["seed"]) for r in map(json.loads, jsonl.read_text().splitlines()) if r}
    for dataset, root, category in SETS:
        if args.only and category not in args.only.split(","):
            continue
        todo = [(c, k, s) for k in map(int, args.shots.split(",")) for s in map(int, args.seeds.split(","))
                for c in configs if (c.tag, category, k, s) not in done]
        if not todo:
            continue
        ds = load_dataset(root, dataset, category)
        cache = TestCache(ds, encoder, vae, SCALING_FACTOR, profile.diffusion.image_size, ROOT / args.cache_dir)
        for cfg, k, seed in todo:
            rec = run_one(ds, profile, encoder, cache, k, seed, cfg, ROOT / args.runs_dir, coreset=args.coreset,
                          comparisons=comparisons)
            rec["threads"] = args.threads
            rec["commit"] = commit
            with jsonl.open("a") as fh:
                fh.write(json.dumps(rec) + "\n")
            v = rec["variants"]
            print(f"{cfg.tag} {category} k={k} seed={seed}: " + ", ".join(
                f"{n} {100 * m['image_auroc']:.1f}" for n, m in v.items()) + f" ({rec['wall_s']:.0f}s)", flush=True)
            write_summary(args.name, jsonl, header)


if __name__ == "__main__":
    main()
