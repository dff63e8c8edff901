"""Accuracy of the lite detection core (v3 default) against the v1 baseline, same harness (`evaluate`).

Runs the lite profile as it now stands (its default setting; ``--image-size`` for the fast
setting; JPEG draft decode and the
exported coreset as a bundle scores) on hazelnut, tire and textile at
1/2/4 shots x seeds 0/1/2, shots-only memory bank. Every finished (category, shots, seed) run is
appended to ``benchmarks/results/<name>.runs.jsonl`` at once (a killed run resumes there; without
that file the runs recorded in ``<name>.json`` are the starting point), and
the JSON + markdown table are rewritten after each, with the baseline's figures
(``--baseline``, measured by ``benchmarks.accuracy`` with the v1 defaults) beside them.

Usage: python -m benchmarks.accuracy_v2 [--name accuracy_lite_v2] [--baseline accuracy_lite_v1_baseline]
           [--only tire,textile] [--shots 1,2,4] [--seeds 0,1,2] [--image-size 224] [--search-precision int8]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from o2n_edge import __version__
from o2n_edge.data import load_dataset
from o2n_edge.detection_metrics import mean_std
from o2n_edge.evaluation import METRIC_KEYS, evaluate
from o2n_edge.profiles import get_profile

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared" / "data").resolve()
RESULTS = ROOT / "benchmarks" / "results"
SETS = [("mvtec", SHARED / "hazelnut_toy", "hazelnut"), ("mvtec", SHARED / "mvtec3d_rgb", "tire"), ("textile", None, "textile")]
SHOWN = ("image_auroc", "image_ap", "pixel_auroc", "pixel_pro")


def _pct(mu: float | None, sd: float | None = None) -> str:
    """A fraction as percent with one decimal (± the spread when given); — for missing."""
    if mu is None:
        return "—"
    return f"{100 * mu:.1f}" if sd is None else f"{100 * mu:.1f} ± {100 * sd:.1f}"


def baseline_table(name: str) -> dict[tuple[str, int], dict]:
    """(category, shots) -> the baseline's summary row."""
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return {}
    doc = json.loads(path.read_text())
    if "rows" in doc:  # a result of this script: one row per (category, shots)
        return {(r["category"], r["shots"]): r for r in doc["rows"]}
    return {(r["category"], s["shots"]): s for r in doc["results"] for s in r["summary"]}


def summarize(records: list[dict], base: dict, variant: str) -> tuple[list[dict], str]:
    """Rows per (category, shots) with the baseline beside them, and their markdown table."""
    order = [c for _, _, c in SETS]
    keys = sorted({(r["category"], r["shots"]) for r in records}, key=lambda x: (order.index(x[0]), x[1]))
    lines = ["| category | shots | seeds | variant | image AUROC (base) | image AUROC (default) | Δ | image AP | pixel AUROC (base) | "
             "pixel AUROC (default) | PRO (base) | PRO (default) | setting (per seed) | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for cat, k in keys:
        group = sorted([r for r in records if r["category"] == cat and r["shots"] == k], key=lambda r: r["seed"])
        row: dict = {"category": cat, "shots": k, "seeds": [r["seed"] for r in group], "variant": variant}
        for m in METRIC_KEYS:
            vals = [r[m] for r in group if r.get(m) is not None]
            row[m] = dict(zip(("mean", "std"), mean_std(vals))) if vals else None
        b = base.get((cat, k), {})
        row["baseline"] = {m: b.get(m) for m in METRIC_KEYS}
        row["settings"] = [r.get("setting", "fixed") for r in group]
        rows.append(row)

        def cell(d, m):
            return _pct(d[m]["mean"], d[m]["std"]) if d.get(m) else "—"

        delta = (f"{100 * (row['image_auroc']['mean'] - b['image_auroc']['mean']):+.1f}"
                 if b.get("image_auroc") and row.get("image_auroc") else "—")
        lines.append(f"| {cat} | {k} | {','.join(map(str, row['seeds']))} | {variant} | {cell(b, 'image_auroc')} | "
                     f"{cell(row, 'image_auroc')} | {delta} | {cell(row, 'image_ap')} | {cell(b, 'pixel_auroc')} | "
                     f"{cell(row, 'pixel_auroc')} | {cell(b, 'pixel_pro')} | {cell(row, 'pixel_pro')} | "
                     f"{'; '.join(row['settings'])} | {sum(r['wall_s'] for r in group):.0f} |")
    # the headline figure: mean image AUROC over tire and textile (all shots), v2 vs v1
    head = [r for r in rows if r["category"] in ("tire", "textile") and r.get("image_auroc") and r["baseline"].get("image_auroc")]
    if head:
        v2 = float(np.mean([r["image_auroc"]["mean"] for r in head]))
        v1 = float(np.mean([r["baseline"]["image_auroc"]["mean"] for r in head]))
        lines.append("")
        lines.append(f"Mean image AUROC over tire and textile ({len(head)} shot settings): base {100 * v1:.1f} -> "
                     f"default {100 * v2:.1f} ({100 * (v2 - v1):+.1f} points).")
    both = [r for r in rows if r.get("image_auroc") and r["baseline"].get("image_auroc")]
    if both:
        worst = min(both, key=lambda r: r["image_auroc"]["mean"] - r["baseline"]["image_auroc"]["mean"])
        d = 100 * (worst["image_auroc"]["mean"] - worst["baseline"]["image_auroc"]["mean"])
        lines.append(f"Smallest change of any set and shot count: {worst['category']} k={worst['shots']} {d:+.1f} points.")
    return rows, "\n".join(lines) + "\n"


def main() -> None:
    """Run (or resume, or merge) the accuracy runs and rewrite the result files after each."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--name", default="accuracy_lite_v2")
    ap.add_argument("--baseline", default="accuracy_lite_v1_baseline")
    ap.add_argument("--only", default=None)
    ap.add_argument("--shots", default="1,2,4")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--image-size", type=int, default=None, help="the encoder's input side (224 = the fast setting)")
    ap.add_argument("--stats-weight", type=float, default=None, help="the global statistics branch's weight")
    ap.add_argument("--search-precision", default=None, help="float32 | int8: the bank search's arithmetic")
    ap.add_argument("--merge", default=None,
                    help="comma list of result names whose .runs.jsonl are combined into --name (no runs)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)

    from o2n_edge.evaluation import fixed_setting
    from o2n_edge.profiles import with_options

    profile = with_options(get_profile("lite"), image_size=args.image_size,
                           stats_weight=args.stats_weight, search_precision=args.search_precision)
    variant = f"shots-only, fixed: {fixed_setting(profile)}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    jsonl = RESULTS / f"{args.name}.runs.jsonl"
    done = RESULTS / f"{args.name}.json"
    records = ([json.loads(x) for x in jsonl.read_text().splitlines()] if jsonl.exists()
               else json.loads(done.read_text())["runs"] if done.exists() else [])
    if records and not jsonl.exists():  # resume from the finished result: the new runs append to all of it
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    if args.merge:  # parts run in parallel processes, one file each
        records = [json.loads(x) for part in args.merge.split(",")
                   for x in (RESULTS / f"{part}.runs.jsonl").read_text().splitlines()]
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    base = baseline_table(args.baseline)
    shots = [int(x) for x in args.shots.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]

    def write() -> None:
        rows, md = summarize(records, base, variant)
        doc = {"machine": {"platform": platform.platform(), "python": platform.python_version(), "threads": 1},
               "o2n_edge": __version__, "profile": "lite", "variant": variant, "baseline": args.baseline,
               "coreset": profile.coreset_ratio, "jpeg_draft": profile.jpeg_draft,
               "rows": rows, "runs": records}
        (RESULTS / f"{args.name}.json").write_text(json.dumps(doc, indent=2) + "\n")
        (RESULTS / f"{args.name}.md").write_text(
            f"# {args.name}\n\nlite profile, {variant}; percent, mean ± std over seeds; base = `{args.baseline}` "
            f"(same harness; its own file says what it ran). "
            f"The default scores with the exported coreset ({profile.coreset_ratio}) and JPEG draft decode = "
            f"{profile.jpeg_draft}; "
            + "one setting for every category and run. "
            + "Written by `python -m benchmarks.accuracy_v2`.\n\n" + md)

    for dataset, root, category in ([] if args.merge else SETS):
        if args.only and category not in args.only.split(","):
            continue
        todo = [(k, s) for k in shots for s in seeds
                if not any(r["category"] == category and r["shots"] == k and r["seed"] == s for r in records)]
        if not todo:
            continue
        ds = load_dataset(root, dataset, category)
        t = time.perf_counter()

        def on_run(run: dict, category: str = category) -> None:
            rec = {"category": category, **run}
            records.append(rec)
            with jsonl.open("a") as fh:
                fh.write(json.dumps(rec) + "\n")
            write()
            print(f"{category} k={run['shots']} seed={run['seed']}: image AUROC {100 * run['image_auroc']:.1f} "
                  f"({run.get('setting', 'fixed')}, {run['wall_s']:.0f}s)", flush=True)

        ks = sorted({k for k, _ in todo})
        if len(todo) == len(ks) * len(seeds):  # whole shot counts left: one call, the test set encoded once
            evaluate(ds, profile, ks, seeds, ("pool",), progress=False, coreset=profile.coreset_ratio, on_run=on_run)
        else:
            for k in ks:
                evaluate(ds, profile, [k], [s for kk, s in todo if kk == k], ("pool",), progress=False,
                         coreset=profile.coreset_ratio, on_run=on_run)
        print(f"{category}: {time.perf_counter() - t:.0f}s", flush=True)
    write()
    print((RESULTS / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
