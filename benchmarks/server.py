"""Server overhead: `serve` (uvicorn on 127.0.0.1) vs the in-process pipeline, 1 and 4 clients.

Usage: python -m benchmarks.server --bundle bundles/hazelnut-lite --data ../shared/data/hazelnut_toy --category hazelnut
Sends the category's real test JPEGs. Writes benchmarks/results/server.{json,md}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from o2n_edge.bench.env import machine_stamp, set_threads
from o2n_edge.bench.report import write_json, write_text
from o2n_edge.bench.server_bench import __doc__ as NOTE
from o2n_edge.bench.server_bench import bench_server, server_markdown

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--category", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--per-client", type=int, default=40)
    p.add_argument("--name", default="server")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    from o2n_edge.data import load_dataset

    set_threads(a.threads)
    ds = load_dataset(a.data, None, a.category)
    jpegs = [s.path.read_bytes() for s in ds.test]
    doc = {"name": a.name, "machine": machine_stamp(a.threads), "note": " ".join(NOTE.split()),
           "results": [bench_server(a.bundle, a.threads, jpegs, per_client=a.per_client)]}
    write_json(a.out / f"{a.name}.json", doc)
    write_text(a.out / f"{a.name}.md", server_markdown(doc))
    print(server_markdown(doc))


if __name__ == "__main__":
    main()
