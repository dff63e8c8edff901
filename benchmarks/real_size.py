"""Real-size latency: SD-1.5 UNet / VAE and CLIP ViT-B/16 (seeded random weights), torch vs ORT CPU.

Usage: python -m benchmarks.real_size [--resolution 256] [--iters 3] [--threads 1]
Exports are cached under .bench_cache/real_size (gitignored; never committed).
Writes benchmarks/results/latency_real_size.{json,md}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from o2n_edge.bench import bench_main

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", default="256")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--taesd", action="store_true", help="AutoencoderTiny (TAESD architecture) encode/decode instead")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    if a.taesd:
        from o2n_edge.bench.env import machine_stamp, set_threads
        from o2n_edge.bench.models_real_size import TINY_VAE_STAGES, bench_real_size, write_real_size

        set_threads(a.threads)
        doc = {"name": "latency_autoencoder_tiny", "machine": machine_stamp(a.threads),
               "note": "diffusers AutoencoderTiny (TAESD architecture, SD-1.5 latents), seeded random weights: latency "
                       "only. As a drop-in for the SD-1.5 VAE it needs trained weights (TAESD's, or distilled from the "
                       "run's VAE) and its own accuracy check; compare with the AutoencoderKL rows of latency_real_size.",
               "results": [bench_real_size([int(x) for x in a.resolution.split(",")], a.warmup, a.iters, a.threads,
                                           stages=TINY_VAE_STAGES)]}
        print(open(write_real_size(doc, a.out)["md"]).read())
        return
    doc = bench_main(None, "sd15", ["torch", "ort-cpu"], ["fp32"], [1], [int(x) for x in a.resolution.split(",")],
                     a.out, a.warmup, a.iters, a.threads)
    print(open(doc["paths"]["md"]).read())


if __name__ == "__main__":
    main()
