"""`o2n-edge triton`: a bundle -> a Triton Inference Server model repository (torch-free)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from o2n_edge.cli.common import USER_ERRORS, app, fail


@app.command("triton")
def triton_cmd(
    bundle: Path = typer.Argument(..., help="A bundle directory written by `o2n-edge export` (verified first)."),
    out: Path = typer.Option(Path("model_repository"), "--out", help="Model repository to write (atomically)."),
    name: str = typer.Option("o2n", "--name", help="Model name prefix: <name>_inspect, <name>_pipeline, <name>_unet, ..."),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", help="max_batch_size of every model (default: the bundle's TensorRT profile max from its export specs)."),
    queue_delay_us: int = typer.Option(5000, "--queue-delay-us", help="Dynamic batching: how long a request may wait for batch partners."),
    instances: int = typer.Option(1, "--instances", help="Instances of each model (instance_group count)."),
    device: str = typer.Option("cpu", "--device", help="cpu or gpu: where every model's instances run."),
    graph_backend: str = typer.Option("onnxruntime", "--graph-backend", help="Graph models on Triton's onnxruntime backend, or 'python' (ONNX Runtime inside the Python backend) for a Triton without it."),
    engines: bool = typer.Option(True, "--engines/--no-engines", help="Use the bundle's TensorRT plans that are valid on this machine as tensorrt_plan models."),
    threads: int = typer.Option(0, "--threads", help="ONNX Runtime intra-op threads inside the Python models (0 = all cores)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing repository."),
) -> None:
    """Write a Triton model repository: each graph a model, a BLS pipeline model, a self-contained model."""
    from o2n_edge.runtime.bundle import BundleError
    from o2n_edge.triton.repository import RepositoryOptions, write_repository

    opts = RepositoryOptions(name=name, max_batch=max_batch, queue_delay_us=queue_delay_us, instances=instances,
                             device=device, graph_backend=graph_backend, engines=engines, threads=threads,
                             force=force)
    try:
        summary = write_repository(bundle, out, opts)
    except (BundleError, FileExistsError, *USER_ERRORS) as exc:
        fail(str(exc))
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{summary.path} · bundle {summary.bundle_hash[:12]} · max batch {summary.max_batch}")
    table.add_column("model")
    table.add_column("backend / platform")
    for model, kind in summary.models.items():
        table.add_row(model, kind)
    console = Console()
    console.print(table)
    console.print("configs checked with Triton's ModelConfig protobuf" if summary.checked else
                  "configs not checked (install o2n-edge[triton] for Triton's ModelConfig protobuf)")
    if not summary.linked:
        console.print("bundle files were copied (the repository is on another file system than the bundle)")
