"""Per-stage latency of bundles: torch eager vs ORT CPU (+ unavailable GPU rows), and ORT knobs/int8.

Usage:
  python -m benchmarks.latency --bundle /tmp/b                       # one bundle -> latency_<profile>.*
  python -m benchmarks.latency --bundle bundles/hazelnut-lite --knobs --data ../shared/data/hazelnut_toy
Writes benchmarks/results/latency_<profile>.{json,md,png} (and ort_knobs_<profile>.{json,md}).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from o2n_edge.bench import bench_main
from o2n_edge.bench.env import machine_stamp, set_threads
from o2n_edge.bench.latency import BACKENDS

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--batch", default="1")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--run-dir", type=Path, default=None, help="the bundle's personalized run (torch rows)")
    p.add_argument("--knobs", action="store_true", help="also ORT knobs and int8 (needs --data/--category)")
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--category", default="hazelnut")
    p.add_argument("--name", default=None, help="result file name (default latency_<profile>)")
    p.add_argument("--note", default="", help="a paragraph written under the machine stamp")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    doc = bench_main(a.bundle, None, a.backends.split(","), ["fp32"], [int(x) for x in a.batch.split(",")], [],
                     a.out, a.warmup, a.iters, a.threads, a.run_dir, a.name, a.note)
    print(open(doc["paths"]["md"]).read())
    if a.knobs:
        from o2n_edge.bench.quantize import int8_study, knob_study, knobs_markdown
        from o2n_edge.bench.report import write_json, write_text

        set_threads(a.threads)
        kdoc = {"name": doc["name"].replace("latency_", "ort_knobs_", 1), "machine": machine_stamp(a.threads),
                "note": "Knob settings run interleaved in one loop; int8 = fp32 vs int8 interleaved, accuracy on "
                        "every test image of the category through the runtime.",
                "results": [knob_study(a.bundle, a.warmup, a.iters)]}
        if a.data:
            kdoc["results"].append(int8_study(a.bundle, a.data, a.category, a.threads, a.warmup, a.iters))
        write_json(a.out / f"{kdoc['name']}.json", kdoc)
        write_text(a.out / f"{kdoc['name']}.md", knobs_markdown(kdoc))
        print(knobs_markdown(kdoc))


if __name__ == "__main__":
    main()
