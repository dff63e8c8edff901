"""Confidence cascade: mean latency on a 95%-good stream and the image-AUROC cost (see o2n_edge.bench.cascade).

Usage: python -m benchmarks.cascade --set bundles/hazelnut-lite:../shared/data/hazelnut_toy:hazelnut [--set ...]
Writes benchmarks/results/cascade.{json,md}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from o2n_edge.bench.cascade import __doc__ as PROTOCOL
from o2n_edge.bench.cascade import cascade_markdown, cascade_study
from o2n_edge.bench.env import machine_stamp, set_threads
from o2n_edge.bench.report import write_json, write_text

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", action="append", required=True,
                   help="BUNDLE:DATA:CATEGORY (DATA 'textile' = the built-in textile set)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--latency-images", type=int, default=60)
    p.add_argument("--name", default="cascade")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    set_threads(a.threads)
    doc = {"name": a.name, "machine": machine_stamp(a.threads), "protocol": " ".join(PROTOCOL.split()), "results": []}
    for s in a.set:
        parts = s.split(":")
        if len(parts) != 3 or not all(parts):
            p.error(f"--set {s!r}: expected BUNDLE:DATA:CATEGORY")
        bundle, data, category = parts
        builtin = data == "textile"
        doc["results"].append(cascade_study(Path(bundle), None if builtin else Path(data), category, a.threads,
                                            latency_images=a.latency_images, dataset="textile" if builtin else None))
    write_json(a.out / f"{a.name}.json", doc)
    write_text(a.out / f"{a.name}.md", cascade_markdown(doc))
    print(cascade_markdown(doc))


if __name__ == "__main__":
    main()
