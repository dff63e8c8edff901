"""The `o2n-edge` command line: a thin typer layer over plain library functions.

Heavy imports (torch, diffusers, open_clip) happen inside the commands that need them, so the
base install (runtime + server) starts fast and a missing extra is named, not a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from o2n_edge._lazy import MissingExtraError

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

    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False)
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


def write_json(path: Path, doc: dict) -> None:
    """Atomic JSON write: a crash never leaves half a result file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


DataOpt = typer.Option(None, "--data", envvar="O2N_DATA", help="Data set root directory (default: $O2N_DATA). Not needed for --dataset textile.")
DatasetOpt = typer.Option("auto", "--dataset", help="Layout: auto (detect), mvtec, visa, folder, or textile (the built-in demo set, needs o2n-edge[demo]).")
ProfileOpt = typer.Option("lite", "--profile", help="Model profile: tiny (tests), lite (CPU, real scores), sd15 (GPU production).")


@app.command("eval")
def eval_cmd(
    data: Optional[Path] = DataOpt,
    dataset: str = DatasetOpt,
    category: Optional[str] = typer.Option(None, "--category", help="Category to evaluate (e.g. hazelnut, pcb); 'textile' for the demo set."),
    shots: str = typer.Option("1,2,4", "--shots", help="Comma list of shot counts k (normal training images used)."),
    seeds: str = typer.Option("0,1,2", "--seeds", help="Comma list of seeds; each seed draws different shots."),
    profile: str = ProfileOpt,
    branches: Optional[str] = typer.Option(None, "--branches", help="Comma list of personalized, pool, text (default: every branch the profile has that needs no personalized run, or all with --run/--personalize)."),
    run: Optional[Path] = typer.Option(None, "--run", help="A personalized run directory (from `o2n-edge personalize`), used for every shots/seed."),
    personalize: bool = typer.Option(False, "--personalize", help="Personalize and distil on the fly for every shots/seed (slow: minutes per run on CPU)."),
    pool_size: Optional[int] = typer.Option(None, "--pool-size", help="Generated images added to the memory bank (0 = shots only; default: the profile's)."),
    personalize_steps: Optional[int] = typer.Option(None, "--personalize-steps", help="With --personalize: optimizer steps per run (default: the profile's)."),
    distill_steps: Optional[int] = typer.Option(None, "--distill-steps", help="With --personalize: distillation steps per run (default: the profile's)."),
    split_csv: Optional[Path] = typer.Option(None, "--split-csv", help="VisA official split csv (default: <data>/split_csv/1cls.csv when present)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result document (per run and mean ± std) to this JSON file."),
    markdown_out: Optional[Path] = typer.Option(None, "--markdown", help="Also write the table as markdown to this file."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars on stderr."),
) -> None:
    """Few-shot evaluation: image AUROC/AP/F1-max (and pixel AUROC/PRO where masks exist), mean ± std over seeds."""
    try:
        from o2n_edge.data import load_dataset
        from o2n_edge.evaluation import evaluate
        from o2n_edge.profiles import get_profile, parse_branches
        from o2n_edge.report import markdown_table, print_table

        if dataset == "textile" and category is None:
            category = "textile"
        if category is None:
            fail("--category is required (e.g. --category hazelnut), except with --dataset textile")
        prof = get_profile(profile)
        personalized_run = run is not None or personalize
        default_branches = prof.branches if personalized_run else tuple(b for b in prof.branches if b != "personalized")
        chosen = parse_branches(branches, prof) if branches else default_branches
        ds = load_dataset(data, None if dataset == "auto" else dataset, category, split_csv=split_csv)
        provider = None
        if personalized_run:
            from o2n_edge.personalized_eval import make_normal_provider

            provider = make_normal_provider(ds, prof, run_dir=run, pool_size=pool_size, progress=progress,
                                            personalize_steps=personalize_steps, distill_steps=distill_steps)
        elif "personalized" in chosen:
            fail("--branches personalized needs --run RUN_DIR or --personalize")
        result = evaluate(ds, prof, parse_int_list(shots, "--shots"), parse_int_list(seeds, "--seeds"), chosen,
                          normal_provider=provider, progress=progress)
    except typer.Exit:
        raise
    except USER_ERRORS as exc:
        fail(str(exc))
    print_table([result])
    if json_out:
        write_json(json_out, result)
        typer.echo(f"wrote {json_out}")
    if markdown_out:
        markdown_out.parent.mkdir(parents=True, exist_ok=True)
        markdown_out.write_text(markdown_table([result]))
        typer.echo(f"wrote {markdown_out}")


@app.command("personalize")
def personalize_cmd(
    category: str = typer.Option(..., "--category", help="Product category (names the prompt 'a photo of sks <category>')."),
    out: Path = typer.Option(..., "--out", help="Run directory (checkpoints, run.json, weights); an interrupted run resumes here."),
    data: Optional[Path] = DataOpt,
    dataset: str = DatasetOpt,
    shots: int = typer.Option(4, "--shots", help="Number k of good training images to personalize on."),
    seed: int = typer.Option(0, "--seed", help="Seed that draws the shots and drives training."),
    images: Optional[list[Path]] = typer.Option(None, "--image", help="Personalize on these image files instead of drawing shots from --data (repeatable)."),
    profile: str = ProfileOpt,
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (defaults: tiny 30, lite 2000, sd15 800)."),
    base_model: Optional[Path] = typer.Option(None, "--base-model", envvar="O2N_SD15", help="sd15: local diffusers SD-1.5 checkpoint directory (default: $O2N_SD15)."),
    lora_rank: int = typer.Option(8, "--lora-rank", help="sd15: LoRA rank."),
    prior_preservation: bool = typer.Option(False, "--prior-preservation", help="sd15: DreamBooth prior preservation with generated class images."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar with the loss."),
) -> None:
    """DreamBooth-personalize the profile's diffusion model on k good images (resumable)."""
    try:
        from dataclasses import replace

        from o2n_edge.data import load_dataset, load_image, sample_shots
        from o2n_edge.diffusion.personalize import personalize
        from o2n_edge.profiles import get_profile

        prof = get_profile(profile)
        spec = replace(prof.diffusion, base_model=str(base_model)) if base_model else prof.diffusion
        if images:
            paths = list(images)
        else:
            ds = load_dataset(data, None if dataset == "auto" else dataset, category)
            paths = sample_shots(ds.train_good, shots, seed)
        imgs = [load_image(p, spec.image_size) for p in paths]
        personalize(imgs, category, spec, out, steps=steps, seed=seed, progress=progress,
                    lora_rank=lora_rank, prior_preservation=prior_preservation)
    except typer.Exit:
        raise
    except USER_ERRORS as exc:
        fail(str(exc))
    typer.echo(f"personalized {category} on {len(paths)} images: {out} ({', '.join(p.name for p in paths)})")


@app.command("distill")
def distill_cmd(
    run: Path = typer.Argument(..., help="A run directory from `o2n-edge personalize`."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Consistency-distillation steps (defaults: tiny 20, lite 500, sd15 1000)."),
    inference_steps: Optional[int] = typer.Option(None, "--inference-steps", help="Few-step target (1-8; default: the profile's)."),
    lcm_lora: Optional[Path] = typer.Option(None, "--lcm-lora", help="sd15: merge this pretrained LCM-LoRA (local file) instead of distilling."),
    lcm_lora_scale: float = typer.Option(1.0, "--lcm-lora-scale", help="sd15: weight of the LCM-LoRA in the merge."),
    personal_lora_scale: float = typer.Option(1.0, "--personal-lora-scale", help="sd15: weight of the personalization LoRA in the merge."),
    seed: int = typer.Option(0, "--seed"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Distil a personalized run into a few-step (LCM) student and measure it against the many-step teacher."""
    try:
        import json as _json

        from o2n_edge.diffusion.distill import distill
        from o2n_edge.diffusion.run_dir import RunDir

        if not RunDir(run).run_json.is_file():
            fail(f"{run} is not a personalized run (no run.json): run `o2n-edge personalize` first")
        kwargs = {} if inference_steps is None else {"num_inference_steps": inference_steps}
        if inference_steps is None:
            info = _json.loads(RunDir(run).run_json.read_text())
            kwargs["num_inference_steps"] = int(info.get("spec", {}).get("steps", 4))
        distill(run, steps=steps, lcm_lora=lcm_lora, lcm_lora_scale=lcm_lora_scale,
                personal_lora_scale=personal_lora_scale, progress=progress, seed=seed, **kwargs)
        d = _json.loads(RunDir(run).distill_json.read_text())
    except typer.Exit:
        raise
    except USER_ERRORS as exc:
        fail(str(exc))
    typer.echo(f"student written to {RunDir(run).student}")
    for k, v in d.get("distances", {}).get("student", {}).items():
        typer.echo(f"  {k}-step student vs 50-step teacher: PSNR {v['psnr']:.1f} dB, latent MSE {v['latent_mse']:.4f}")


@app.command("transform")
def transform_cmd(
    run: Path = typer.Argument(..., help="A personalized (and ideally distilled) run directory."),
    images: list[Path] = typer.Argument(..., help="Query images."),
    out: Path = typer.Option(..., "--out", help="Directory for query | normal-version side-by-side PNGs."),
    strength: Optional[float] = typer.Option(None, "--strength", help="Noise strength (default: the profile's)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="LCM steps (default: the profile's)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the transform noise (deterministic)."),
    teacher: bool = typer.Option(False, "--teacher", help="Run the many-step DDIM teacher instead of the student (quality reference)."),
) -> None:
    """Write each query beside its normal version, so a person can look at them."""
    try:
        import numpy as np
        from PIL import Image

        from o2n_edge.data import load_image
        from o2n_edge.diffusion import load_run, one_to_normal

        loaded = load_run(run)
        out.mkdir(parents=True, exist_ok=True)
        size = loaded.image_size
        for path in images:
            q = load_image(path, size)
            res = one_to_normal(loaded, q[None], strength=strength, steps=steps, seed=seed, use_student=not teacher)
            pair = np.concatenate([q, res.normals[0]], axis=1)
            target = out / f"{path.stem}_normal.png"
            Image.fromarray(pair).save(target)
            typer.echo(f"{target}  ({res.unet}, {res.scheduler}, {res.steps_run} steps run at strength {res.strength})")
    except typer.Exit:
        raise
    except USER_ERRORS as exc:
        fail(str(exc))


@app.command("export")
def export_cmd(
    category: str = typer.Option(..., "--category", help="Product category (e.g. pcb, hazelnut; 'textile' for the built-in set)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Bundle directory to write (default: bundles/<category>-<profile>)."),
    data: Optional[Path] = DataOpt,
    dataset: str = DatasetOpt,
    shots: int = typer.Option(4, "--shots", help="Number k of good images (shots) to personalize on."),
    seed: int = typer.Option(0, "--seed", help="Seed that draws the shots (and the transform noise)."),
    profile: str = ProfileOpt,
    run: Optional[Path] = typer.Option(None, "--run", help="Use this personalized run instead of personalizing and distilling first."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where personalized runs are cached and resumed."),
    branches: Optional[str] = typer.Option(None, "--branches", help="Comma list of personalized, pool, text (default: all the profile has)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 or fp16 graphs (fp16 keeps overflow-prone layers in fp32)."),
    pool_size: Optional[int] = typer.Option(None, "--pool-size", help="Generated images added to the memory bank (0 = shots only)."),
    coreset: Optional[float] = typer.Option(None, "--coreset", help="Keep this fraction of the memory bank (greedy k-center; 1 = whole bank); default: the profile's (lite 0.1; others only above 50,000 rows)."),
    quantile: float = typer.Option(0.99, "--threshold-quantile", help="Threshold = this quantile of held-out good images' scores."),
    trt: bool = typer.Option(False, "--trt", help="Also build TensorRT engines (needs an NVIDIA GPU and o2n-edge[trt])."),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle and redo every export stage."),
    base_model: Optional[Path] = typer.Option(None, "--base-model", envvar="O2N_SD15", help="sd15: local diffusers SD-1.5 checkpoint directory (default: $O2N_SD15)."),
    encoder_checkpoint: Optional[Path] = typer.Option(None, "--encoder-checkpoint", envvar="O2N_CLIP", help="sd15: local open_clip checkpoint for the vision/text encoder (default: $O2N_CLIP)."),
    personalize_steps: Optional[int] = typer.Option(None, "--personalize-steps", help="Personalization steps when no --run is given (default: the profile's)."),
    distill_steps: Optional[int] = typer.Option(None, "--distill-steps", help="Distillation steps when no --run is given (default: the profile's)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress on stderr."),
) -> None:
    """Personalize, distil, export every graph to ONNX, calibrate the threshold, and write a verified bundle."""
    try:
        from o2n_edge.export.build import ExportOptions, export_bundle

        if dataset == "textile" and category != "textile":
            fail("--dataset textile has the single category 'textile'")
        if category == "textile" and dataset == "auto" and data is None:
            dataset = "textile"
        target = out or Path("bundles") / f"{category}-{profile}"
        summary = export_bundle(ExportOptions(
            category=category, out=target, profile=profile, data=data,
            dataset=None if dataset == "auto" else dataset, shots=shots, seed=seed, run_dir=run, runs_dir=runs_dir,
            branches=branches, precision=precision, pool_size=pool_size, coreset_ratio=coreset,
            threshold_quantile=quantile, force=force, progress=progress,
            personalize_steps=personalize_steps, distill_steps=distill_steps, base_model=base_model,
            encoder_checkpoint=encoder_checkpoint))
    except typer.Exit:
        raise
    except (FileExistsError, *USER_ERRORS) as exc:
        fail(str(exc))
    m = summary.manifest
    typer.echo(f"wrote {summary.bundle} ({summary.bytes / 1e6:.1f} MB, {m['precision']}, threshold {m['threshold']['value']:.4f})")
    for name, entry in m["models"].items():
        typer.echo(f"  {name}: max |onnx - torch| = {max(entry['validation'].values()):.2e} "
                   f"(tolerance {entry['tolerance']:.0e} x max(1, max |torch output|))")
    typer.echo(f"  runtime vs torch scores: max |diff| = {summary.parity['max_abs']:.2e} on {summary.parity['n']} images")
    typer.echo("  wall s: " + ", ".join(f"{k} {v:.1f}" for k, v in summary.wall_s.items()))
    if trt:
        _build_engines(summary.bundle, precision)


def _build_engines(bundle: Path, precision: str) -> None:
    from o2n_edge.export.tensorrt_build import TensorRTUnavailable, build_engines

    try:
        reports = build_engines(bundle, precision=precision)
    except TensorRTUnavailable as exc:
        fail(str(exc))
    for name, rep in reports.items():
        typer.echo(f"  engine {name}: {rep}")


@app.command("build-engines")
def build_engines_cmd(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    precision: str = typer.Option("fp16", "--precision", help="fp16 or fp32 TensorRT engines."),
) -> None:
    """Build TensorRT engines for a bundle on this device (cached by onnx hash, TensorRT version, GPU and profile)."""
    _build_engines(bundle, precision)


@app.command("inspect")
def inspect_cmd(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest summary as JSON."),
) -> None:
    """What is inside a bundle and whether it verifies (exit 1 when it does not)."""
    from o2n_edge.runtime.bundle import read_manifest, verify_bundle

    problems = verify_bundle(bundle)
    try:
        m = read_manifest(bundle)
    except Exception as exc:  # a bundle without a readable manifest: report, do not crash
        m = {}
        problems = problems or [str(exc)]
    files = m.get("files", {})
    engines = sorted(p.name for p in (bundle / "engines").glob("*.plan")) if (bundle / "engines").is_dir() else []
    info = {
        "bundle": str(bundle), "verified": not problems, "problems": problems,
        "profile": m.get("profile"), "category": m.get("category"), "precision": m.get("precision"),
        "image_size": m.get("image_size"), "diffusion_image_size": m.get("diffusion_image_size"),
        "branches": m.get("scoring", {}).get("branches"), "threshold": m.get("threshold", {}).get("value"),
        "steps": m.get("steps"), "steps_run": m.get("steps_run"), "strength": m.get("strength"),
        "shots": m.get("shots"), "memory_bank": m.get("memory_bank"),
        "models": {k: {"precision": v.get("precision"), "inputs": v.get("inputs"), "outputs": v.get("outputs"),
                       "validation": v.get("validation")} for k, v in m.get("models", {}).items()},
        "files": {k: {"bytes": v.get("bytes"), "sha256": v.get("sha256")} for k, v in files.items()},
        "engines": engines, "versions": m.get("versions"),
    }
    if as_json:
        typer.echo(json.dumps(info, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        c = Console()
        status = "[green]verified[/]" if not problems else "[bold red]REFUSED[/]"
        c.print(f"{bundle}: {status}")
        for p in problems:
            c.print(f"  [red]- {p}[/]")
        for key in ("profile", "category", "precision", "image_size", "diffusion_image_size", "branches",
                    "threshold", "steps", "steps_run", "strength", "shots", "memory_bank"):
            if info[key] is not None:
                c.print(f"  {key}: {info[key]}")
        table = Table(title="files")
        for col in ("file", "bytes", "sha256"):
            table.add_column(col)
        for k, v in info["files"].items():
            table.add_row(k, f"{v['bytes']:,}" if v["bytes"] is not None else "?", str(v["sha256"])[:16] + "…")
        c.print(table)
        c.print(f"  engines: {', '.join(engines) if engines else 'none (build-engines on the target GPU)'}")
    if problems:
        raise typer.Exit(1)


BundleOpt = typer.Option(..., "--bundle", help="A bundle directory written by `o2n-edge export`.", exists=False)
BackendOpt = typer.Option("cpu", "--backend", help="Execution: cpu, cuda (ORT CUDA EP), tensorrt (ORT TensorRT EP) or trt-native (the bundle's TensorRT engines); falls back to cpu with a log line when unavailable.")
ThreadsOpt = typer.Option(0, "--threads", help="ONNX Runtime intra-op threads (0 = all cores).")


def _open_pipeline(bundle: Path, backend: str, threads: int):
    """Load and verify a bundle into an ONNX Runtime pipeline (torch-free)."""
    import logging

    from o2n_edge.runtime.pipeline import OrtPipeline, SessionOptions

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return OrtPipeline(bundle, SessionOptions(backend=backend, intra_op_threads=threads))


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
    from o2n_edge.data.images import ImageError, load_image
    from o2n_edge.runtime.bundle import BundleError

    try:
        pipe = _open_pipeline(bundle, backend, threads)
    except (BundleError, *USER_ERRORS) as exc:
        fail(str(exc))
    if save_maps:
        save_maps.mkdir(parents=True, exist_ok=True)
    out, bad = [], 0
    for path in images:
        try:
            img = load_image(path)
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
) -> None:
    """Serve a bundle over HTTP for the line: POST /v1/inspect, operator page at /, /metrics, /healthz, /readyz."""
    from o2n_edge.runtime.bundle import BundleError

    try:
        pipe = _open_pipeline(bundle, backend, threads)
        from o2n_edge.runtime.server import run_server
    except (BundleError, *USER_ERRORS) as exc:
        fail(str(exc))
    run_server(pipe, log_path, host=host, port=port, token=token, max_body_bytes=int(max_body_mb * 1024 * 1024),
               max_queue=max_queue, workers=workers)


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


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
