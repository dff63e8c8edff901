"""Triton (dynamic batching on) vs `o2n-edge serve`, same bundle, 1/4/8 concurrent clients.

Usage: python -m benchmarks.triton --bundle bundles/hazelnut-lite-shots --data ../shared/data/hazelnut_toy --category hazelnut
Needs o2n-edge[triton] (the PyPI tritonserver). Sends the category's real test JPEGs.
Writes benchmarks/results/<name>.{json,md} (default name triton_lite).
"""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

from o2n_edge.bench.env import load_average, machine_stamp, set_threads
from o2n_edge.bench.report import write_json, write_text
from o2n_edge.bench.triton_bench import __doc__ as NOTE
from o2n_edge.bench.triton_bench import bench_triton, triton_markdown

RESULTS = Path(__file__).resolve().parent / "results"


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _site_prefix() -> str:
    """The models' numpy < 2 site folder, when one was given (see o2n_edge.triton.local_server)."""
    from o2n_edge.triton.local_server import SITE_ENV

    site = os.environ.get(SITE_ENV)
    return f"{SITE_ENV}={site} " if site else ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--category", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--name", default="triton_lite")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    from o2n_edge.data import load_dataset
    from o2n_edge.triton.local_server import unavailable

    why = unavailable()
    if why:
        p.error(f"the real tritonserver cannot run here: {why}")
    set_threads(a.threads)
    ds = load_dataset(a.data, None, a.category)
    jpegs = [s.path.read_bytes() for s in ds.test]
    doc = {"name": a.name, "machine": machine_stamp(a.threads), "uptime_start": _uptime(),
           "note": " ".join(NOTE.split()), "command": _site_prefix() + "python -m benchmarks.triton " + " ".join(
               f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if k != "out")}
    doc["result"] = bench_triton(a.bundle, a.threads, jpegs, max_batch=a.max_batch)
    doc["uptime_end"] = _uptime()
    doc["machine"]["load_average_end"] = load_average()
    write_json(a.out / f"{a.name}.json", doc)
    write_text(a.out / f"{a.name}.md", triton_markdown(doc))
    print(triton_markdown(doc))


if __name__ == "__main__":
    main()
