"""The latency benchmark command (library code in o2n_edge.bench; studies in benchmarks/)."""

from __future__ import annotations

from pathlib import Path

import typer

from o2n_edge.cli.common import (
    USER_ERRORS,
    app,
    fail,
    parse_int_list,
)


@app.command("bench")
def bench_cmd(
    bundle: Path = typer.Option(..., "--bundle", help="Benchmark this bundle (per stage, per backend)."),
    backends: str = typer.Option("ort-cpu,ort-cuda,ort-tensorrt", "--backends", help="Comma list; unavailable ones are reported with the reason, never estimated."),
    precision: str = typer.Option("fp32", "--precision", help="Comma list of fp32, fp16 (fp16 checks that the bundle was exported in fp16)."),
    batch: str = typer.Option("1", "--batch", help="Comma list of batch sizes."),
    out_dir: Path = typer.Option(Path("benchmarks/results"), "--out", help="Where the JSON, markdown table and PNG plot go."),
    warmup: int = typer.Option(3, "--warmup", help="Warm-up iterations (not timed)."),
    iters: int = typer.Option(30, "--iters", help="Timed iterations."),
    threads: int = typer.Option(1, "--threads", help="Threads for ORT and BLAS alike (a fair comparison)."),
) -> None:
    """Latency per stage and end to end (p50/p90/p99), throughput and peak memory; JSON + markdown + plot.

    The torch-eager baseline, int8 and real-size SD-1.5 figures are studies:
    python -m benchmarks.latency_vs_torch, benchmarks.ort_knobs, benchmarks.real_size.
    """
    try:
        from o2n_edge.bench import bench_main

        doc = bench_main(bundle, [b.strip() for b in backends.split(",") if b.strip()],
                         [p.strip() for p in precision.split(",") if p.strip()], parse_int_list(batch, "--batch"),
                         out_dir, warmup, iters, threads)
    except typer.Exit:
        raise
    except USER_ERRORS as exc:
        fail(str(exc))
    typer.echo(f"wrote results under {out_dir}")
    for line in doc.get("summary_lines", []) if isinstance(doc, dict) else []:
        typer.echo(line)
