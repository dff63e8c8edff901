"""Accuracy benchmark: `o2n-edge eval` on the built-in textile set and every set in ../shared/data.

Writes benchmarks/results/<name>.json (every run and mean ± std) and <name>.md (the table).
Usage: python -m benchmarks.accuracy [--profile lite] [--branches pool] [--name accuracy_lite_baseline]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from o2n_edge import __version__
from o2n_edge.data import load_dataset
from o2n_edge.evaluation import evaluate
from o2n_edge.profiles import get_profile, parse_branches
from o2n_edge.eval_tables import markdown_table

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared" / "data").resolve()
RESULTS = ROOT / "benchmarks" / "results"
# (dataset, data root, category)
SETS = [
    ("textile", None, "textile"),
    ("mvtec", SHARED / "hazelnut_toy", "hazelnut"),
    ("mvtec", SHARED / "mvtec3d_rgb", "tire"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--profile", default="lite")
    ap.add_argument("--branches", default=None)
    ap.add_argument("--shots", default="1,2,4")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--name", default=None)
    ap.add_argument("--only", default=None, help="comma list of categories to run")
    args = ap.parse_args()
    profile = get_profile(args.profile)
    branches = parse_branches(args.branches, profile) if args.branches else tuple(
        b for b in profile.branches if b != "personalized")
    name = args.name or f"accuracy_{args.profile}_{'+'.join(branches)}"
    shots = [int(x) for x in args.shots.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    results = []
    for dataset, root, category in SETS:
        if args.only and category not in args.only.split(","):
            continue
        t = time.perf_counter()
        ds = load_dataset(root, dataset, category)
        res = evaluate(ds, profile, shots, seeds, branches, progress=False)
        print(f"{category}: {res['summary'][0]['image_auroc']} ... {time.perf_counter() - t:.0f}s", flush=True)
        results.append(res)
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                       "python": platform.python_version()},
           "o2n_edge": __version__, "results": results}
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(
        f"# {name}\n\nPercent, mean ± std over seeds {args.seeds}; wall s = total over seeds.\n\n"
        + markdown_table(results))
    print((RESULTS / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
