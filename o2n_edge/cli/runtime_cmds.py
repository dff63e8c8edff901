"""Line-side commands (torch-free): score images, serve a bundle over HTTP, read the results log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from o2n_edge.cli.common import (
    USER_ERRORS,
    BackendOpt,
    BundleOpt,
    ThreadsOpt,
    app,
    fail,
    open_pipeline,
)


@app.command("infer")
def infer_cmd(
    images: list[Path] = typer.Argument(..., help="Image files to score."),
    bundle: Path = BundleOpt,
    backend: str = BackendOpt,
    threads: int = ThreadsOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document (a list of results) instead of a table."),
    save_maps: Optional[Path] = typer.Option(None, "--save-maps", help="Write query | normal version | heat-map overlay PNGs here."),
) -> None:
    """Score images from the shell with a bundle (no torch needed). Exit code 1 if any image was unreadable."""
    from o2n_edge.data.images import ImageError, read_image_bytes
    from o2n_edge.runtime.bundle import BundleError

    try:
        pipe = open_pipeline(bundle, backend, threads)
    except (BundleError, *USER_ERRORS) as exc:
        fail(str(exc))
    if save_maps:
        save_maps.mkdir(parents=True, exist_ok=True)
    out, bad = [], 0
    for path in images:
        try:
            img = pipe.decode(read_image_bytes(path), str(path))
        except ImageError as exc:
            bad += 1
            out.append({"image": str(path), "error": str(exc)})
            continue
        r = pipe.inspect(img)
        row = {"image": str(path), **r.to_json()}
        if save_maps:
            from o2n_edge.runtime.render import side_by_side_png

            target = save_maps / f"{path.stem}_o2n.png"
            target.write_bytes(side_by_side_png(r.query, r.normal, r.anomaly_map))
            row["map"] = str(target)
        out.append(row)
    if as_json:
        typer.echo(json.dumps(out, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{bundle} · threshold {pipe.threshold:.4g} · {', '.join(pipe.providers)}")
        for c in ("image", "score", "decision", "total ms"):
            table.add_column(c)
        for row in out:
            if "error" in row:
                table.add_row(row["image"], "—", f"[red]error: {row['error']}[/]", "—")
            else:
                color = "red" if row["anomalous"] else "green"
                table.add_row(row["image"], f"{row['score']:.4f}", f"[{color}]{row['decision']}[/]",
                              f"{row['timings_ms']['total']:.1f}")
        Console().print(table)
    if bad:
        raise typer.Exit(1)


@app.command("serve")
def serve_cmd(
    bundle: Path = BundleOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Bind address (loopback by default; use a token when exposing it)."),
    port: int = typer.Option(8080, "--port", help="TCP port."),
    token: Optional[str] = typer.Option(None, "--token", envvar="O2N_TOKEN", help="Bearer token required on /v1/* (default: $O2N_TOKEN; none = open)."),
    log_path: Path = typer.Option(Path("o2n-results.db"), "--log", help="SQLite results log (WAL): every decision is appended before it is answered."),
    backend: str = BackendOpt,
    threads: int = ThreadsOpt,
    max_body_mb: float = typer.Option(20.0, "--max-body-mb", help="Largest accepted request body (413 above)."),
    max_queue: int = typer.Option(8, "--max-queue", help="Requests in flight + waiting; beyond it the answer is 503 + Retry-After."),
    workers: int = typer.Option(1, "--workers", help="Inference threads."),
    admin_token: Optional[str] = typer.Option(None, "--admin-token", envvar="O2N_ADMIN_TOKEN", help="Bearer token for POST /v1/admin/reload (default: $O2N_ADMIN_TOKEN; none = reload disabled, 403). SIGHUP reloads --bundle either way."),
    keep_images: Optional[Path] = typer.Option(None, "--keep-images", help="Keep each inspected image's original bytes here as <sha256>.<ext> (for verdicts and `o2n-edge learn`)."),
    keep_max_files: int = typer.Option(20_000, "--keep-max-files", help="Most kept images; the oldest are removed first."),
    keep_max_bytes: int = typer.Option(2 * 1024**3, "--keep-max-bytes", help="Most bytes of kept images; the oldest are removed first. Keeping also pauses while the file system has under 5% (or 256 MiB) free."),
) -> None:
    """Serve a bundle over HTTP for the line: POST /v1/inspect, /v1/feedback, /v1/admin/reload, operator page at /, /metrics, /healthz, /readyz."""
    from o2n_edge.runtime.bundle import BundleError

    try:
        pipe = open_pipeline(bundle, backend, threads)
        from o2n_edge.runtime.image_store import ImageStore
        from o2n_edge.runtime.server import run_server

        store = ImageStore(keep_images, keep_max_files, keep_max_bytes) if keep_images is not None else None
    except (BundleError, OSError, *USER_ERRORS) as exc:
        fail(str(exc))
    run_server(pipe, log_path, host=host, port=port, token=token, max_body_bytes=int(max_body_mb * 1024 * 1024),
               max_queue=max_queue, workers=workers, admin_token=admin_token, bundle_path=bundle,
               loader=lambda path: open_pipeline(path, backend, threads), store=store)


@app.command("results")
def results_cmd(
    log_path: Path = typer.Option(Path("o2n-results.db"), "--log", help="The results log written by `o2n-edge serve`."),
    fmt: str = typer.Option("csv", "--format", help="csv or json."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output file (default: stdout)."),
) -> None:
    """Read the decisions log back as CSV or JSON."""
    from o2n_edge.runtime.results_log import ResultsLogError, export_results

    if fmt not in ("csv", "json"):
        fail("--format must be csv or json")
    try:
        export_results(log_path, fmt, out)  # type: ignore[arg-type]
    except (ResultsLogError, *USER_ERRORS) as exc:
        fail(str(exc))


