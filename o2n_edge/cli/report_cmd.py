"""`o2n-edge report`: the acceptance report of a bundle on a labelled test set (torch-free)."""

from __future__ import annotations

from pathlib import Path

import typer

from o2n_edge.cli.common import (
    USER_ERRORS,
    BackendOpt,
    BundleOpt,
    DataOpt,
    DatasetOpt,
    ThreadsOpt,
    app,
    fail,
)


@app.command("report")
def report_cmd(
    bundle: Path = BundleOpt,
    out: Path | None = typer.Option(None, "--out", help="Report directory to write (report.html + report.json; default: reports/<bundle name>)."),
    data: Path | None = DataOpt,
    dataset: str = DatasetOpt,
    category: str | None = typer.Option(None, "--category", help="Category in the data set (default: the bundle's)."),
    target_frr: float = typer.Option(0.01, "--target-frr", help="Also report the threshold that rejects at most this fraction of good test images, and its escape rate."),
    confidence: float = typer.Option(0.95, "--confidence", help="Confidence level of the binomial intervals (Clopper-Pearson)."),
    gallery: int = typer.Option(6, "--gallery", help="Images in each gallery row (worst escapes, worst false rejects)."),
    backend: str = BackendOpt,
    threads: int = ThreadsOpt,
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress on stderr."),
) -> None:
    """Acceptance report of a bundle on a test split: false-reject and escape rates at its threshold, per defect type, plots, misses (needs o2n-edge[report], no torch)."""
    from o2n_edge.acceptance import build_report, require_report_extra
    from o2n_edge.data import DatasetError, load_dataset
    from o2n_edge.data.images import ImageError
    from o2n_edge.runtime.manifest import BundleError, load_manifest

    try:
        require_report_extra()
        manifest = load_manifest(bundle)
        cat = category or manifest.category or ""
        if not cat:
            fail("the bundle names no category: pass --category")
        ds_name = dataset
        if ds_name == "auto" and data is None and manifest.dataset == "textile":
            ds_name = "textile"
        ds = load_dataset(data, None if ds_name == "auto" else ds_name, cat)
        target = out or Path("reports") / bundle.name
        summary = build_report(bundle, ds, target, backend=backend, threads=threads, target_frr=target_frr,
                               confidence=confidence, gallery_size=gallery, progress=progress)
    except typer.Exit:
        raise
    except (BundleError, DatasetError, ImageError, FileExistsError, *USER_ERRORS) as exc:
        fail(str(exc))
    d = summary.doc
    op, op_t = d["at_bundle_threshold"], d["at_target_frr"]

    def line(r: dict) -> str:
        return f"{r['count']}/{r['n']} = {100 * r['rate']:.1f}% [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"

    conf = f"{100 * d['confidence']:g}% CI"
    typer.echo(f"wrote {summary.html} and {summary.json.name} ({d['n_test']} images, {d['wall_s']:.0f} s)")
    typer.echo(f"  bundle threshold {op['threshold']:.4g}: false rejects {line(op['false_reject'])}, "
               f"escapes {line(op['escape'])} ({conf})")
    typer.echo(f"  threshold for <= {100 * d['target_frr']:g}% false rejects {op_t['threshold']:.4g}: "
               f"false rejects {line(op_t['false_reject'])}, escapes {line(op_t['escape'])}")
    for r in d["per_type"]:
        typer.echo(f"  {r['defect']}: escapes {line(r['escape'])}, image AUROC {r['image_auroc']:.3f}")
