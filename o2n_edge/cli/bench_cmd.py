"""The latency benchmark command (library code in o2n_edge.bench)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from o2n_edge.cli.common import (
    USER_ERRORS,
    app,
    fail,
    parse_int_list,
)


@app.command("bench")
def bench_cmd(
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="Benchmark this bundle (per stage, per backend)."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Without --bundle: 'sd15' measures the SD-1.5 UNet/VAE and a CLIP ViT-B/16 at real size (seeded random weights)."),
    run: Optional[Path] = typer.Option(None, "--run", help="The run the bundle came from (for the torch-eager reference rows)."),
    backends: str = typer.Option("torch,ort-cpu,ort-cuda,ort-tensorrt,tensorrt", "--backends", help="Comma list; unavailable ones are reported with the reason, never estimated."),
    precision: str = typer.Option("fp32", "--precision", help="Comma list of fp32, fp16, int8."),
    batch: str = typer.Option("1", "--batch", help="Comma list of batch sizes."),
    resolution: str = typer.Option("256", "--resolution", help="Comma list of resolutions (real-size benchmark)."),
    out_dir: Path = typer.Option(Path("benchmarks/results"), "--out", help="Where the JSON, markdown table and PNG plot go."),
    warmup: int = typer.Option(3, "--warmup", help="Warm-up iterations (not timed)."),
    iters: int = typer.Option(30, "--iters", help="Timed iterations."),
    threads: int = typer.Option(1, "--threads", help="Threads for torch, ORT and BLAS alike (a fair comparison)."),
) -> None:
    """Latency per stage and end to end (p50/p90/p99), throughput and peak memory; JSON + markdown + plot."""
    try:
        from o2n_edge.bench import bench_main

        doc = bench_main(bundle, profile, [b.strip() for b in backends.split(",") if b.strip()],
                         [p.strip() for p in precision.split(",") if p.strip()], parse_int_list(batch, "--batch"),
                         parse_int_list(resolution, "--resolution"), out_dir, warmup, iters, threads, run_dir=run)
    except typer.Exit:
        raise
    except USER_ERRORS as exc:
        fail(str(exc))
    typer.echo(f"wrote results under {out_dir}")
    for line in doc.get("summary_lines", []) if isinstance(doc, dict) else []:
        typer.echo(line)

