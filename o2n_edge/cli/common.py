"""Shared pieces of the `o2n-edge` command line: the typer app, one-line errors and common options.

Heavy imports (torch, diffusers, open_clip) happen inside the commands that need them, so the
base install (runtime + server) starts fast and a missing extra is named, not a traceback.
"""

from __future__ import annotations

from pathlib import Path

import typer

from o2n_edge._lazy import MissingExtraError
from o2n_edge.atomic import atomic_write_json

app = typer.Typer(
    name="o2n-edge",
    help="Few-shot visual anomaly detection (One-to-Normal) for production lines: "
    "personalize, distil, export, and serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

@app.callback()
def main_callback(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
) -> None:
    """Few-shot visual anomaly detection (One-to-Normal): personalize, distil, export, serve."""
    if version:
        from o2n_edge import __version__

        typer.echo(__version__)
        raise typer.Exit()


USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, MissingExtraError, NotADirectoryError)


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error to stderr and exit; users see what is wrong, not a traceback."""
    from rich.console import Console
    from rich.markup import escape

    # escape: "pip install 'o2n-edge[build]'" must not lose its "[build]" as a markup tag
    Console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def parse_int_list(text: str, what: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4] with a clear error naming the option."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{what} must be a comma list of integers, got {text!r}")
    if not values:
        fail(f"{what} is empty")
    return values


def parse_shots(text: str) -> list[int]:
    """'1,4,all' -> [1, 4, ALL_SHOTS]: ``all`` is every training good image of the category."""
    from o2n_edge.data.sampling import ALL_SHOTS

    values = []
    for part in (x.strip() for x in text.split(",")):
        if not part:
            continue
        if part.lower() == "all":
            values.append(ALL_SHOTS)
            continue
        try:
            values.append(int(part))
        except ValueError:
            fail(f"--shots must be a comma list of shot counts or 'all', got {text!r}")
        if values[-1] < 1:
            fail(f"--shots must be positive shot counts or 'all', got {text!r}")
    if not values:
        fail("--shots is empty")
    return values


def write_json(path: Path, doc: dict) -> None:
    """Atomic JSON write: a crash never leaves half a result file."""
    atomic_write_json(path, doc)


DataOpt = typer.Option(None, "--data", envvar="O2N_DATA", help="Data set root directory (default: $O2N_DATA). Not needed for --dataset textile.")
DatasetOpt = typer.Option("auto", "--dataset", help="Layout: auto (detect), mvtec, visa, folder, or textile (the built-in demo set, needs o2n-edge[demo]).")
StatsWeightOpt = typer.Option(None, "--stats-weight", help="Weight of the global statistics branch, which finds whole-image defects (0 = off; default: the profile's, lite 0.5). Lower it where good parts vary in lighting and no whole-image defect is expected.")
BrightnessOpt = typer.Option(None, "--brightness-tolerance", help="Brightness matching: an image darker or brighter than the shots' range widened by this fraction is brought back to its edge by one gain, so drifting lighting is not a defect; 'off' where overall brightness is itself the defect (default: the profile's; see docs/decisions/lite-detection-core.md).")
SearchDimsOpt = typer.Option(None, "--search-dims", help="Search the memory bank in its first N principal axes (0 = every dimension; default: the profile's, lite 0); the distance to the found row stays exact. With --bank-rows 2048 and 32 axes a 448-px image took 54 ms instead of 109 with the float32 search, at a cost to the heat maps (docs/decisions/latency.md).")
SearchPrecisionOpt = typer.Option(None, "--search-precision", help="Arithmetic of the memory-bank search on a CPU: float32 (exact) or int8 (an int8 product on the CPU's integer units proposes 4 rows per patch, float32 picks the nearest, its distance exact); default: the profile's, lite int8 (the same scores to 0.05 points, the search about twice as fast). A GPU always searches in float32. Evidence: docs/decisions/latency.md.")
ImageSizeOpt = typer.Option(None, "--image-size", help="Encoder input side in px (default: the profile's; lite 448 sees small defects, 224 is about 4.5x faster per image on a CPU; see docs/decisions/lite-detection-core.md and latency.md).")
BankRowsOpt = typer.Option(None, "--bank-rows", help="Row budget of the memory bank after the coreset ratio (default: the profile's; lite 8192, which 1/2/4 shots at 448 px stay under), so many shots keep the per-image search bounded.")
ProfileOpt = typer.Option("lite", "--profile", help="Model profile: tiny (tests), lite (CPU, real scores), sd15 (GPU production).")

BundleOpt = typer.Option(..., "--bundle", help="A bundle directory written by `o2n-edge export`.", exists=False)
BackendOpt = typer.Option("cpu", "--backend", help="Execution: cpu, cuda (ORT CUDA EP), tensorrt (ORT TensorRT EP) or trt-native (the bundle's TensorRT engines); falls back to cpu with a log line when unavailable.")
ThreadsOpt = typer.Option(0, "--threads", help="ONNX Runtime intra-op threads (0 = all cores).")


def open_pipeline(bundle: Path, backend: str, threads: int):
    """Load and verify a bundle into an ONNX Runtime pipeline (torch-free)."""
    import logging

    from o2n_edge.runtime.pipeline import OrtPipeline, SessionOptions

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return OrtPipeline(bundle, SessionOptions(backend=backend, intra_op_threads=threads))

