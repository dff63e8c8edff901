"""Bundle commands: export a bundle, build its TensorRT engines, and inspect what it holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from o2n_edge.cli.common import (
    USER_ERRORS,
    BankRowsOpt,
    BrightnessOpt,
    DataOpt,
    DatasetOpt,
    ImageSizeOpt,
    ProfileOpt,
    SearchDimsOpt,
    SearchPrecisionOpt,
    StatsWeightOpt,
    app,
    fail,
)


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
    image_size: Optional[int] = ImageSizeOpt,
    stats_weight: Optional[float] = StatsWeightOpt,
    brightness: Optional[str] = BrightnessOpt,
    coreset: Optional[float] = typer.Option(None, "--coreset", help="Keep this fraction of the memory bank (greedy k-center; 1 = whole bank); default: the profile's (lite 0.1; others 1), within --bank-rows."),
    bank_rows: Optional[int] = BankRowsOpt,
    search_dims: Optional[int] = SearchDimsOpt,
    search_precision: Optional[str] = SearchPrecisionOpt,
    quantile: float = typer.Option(0.99, "--threshold-quantile", help="Threshold = this quantile of held-out good images' scores."),
    trt: bool = typer.Option(False, "--trt", help="Also build TensorRT engines (needs an NVIDIA GPU and o2n-edge[trt])."),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle and redo every export stage."),
    base_model: Optional[str] = typer.Option(None, "--base-model", envvar="O2N_SD15", help="sd15: SD-1.5 diffusers checkpoint, a local directory or a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5 (default: $O2N_SD15)."),
    encoder_checkpoint: Optional[str] = typer.Option(None, "--encoder-checkpoint", envvar="O2N_CLIP", help="sd15: open_clip weights: a local file/dir, a pretrained tag of the profile's model (e.g. laion400m_e32) or hf-hub:org/name (default: $O2N_CLIP)."),
    lcm_lora: Optional[str] = typer.Option(None, "--lcm-lora", help="sd15: LCM-LoRA merged with the personalization LoRA, a local file or hub id (default: latent-consistency/lcm-lora-sdv1-5); 'none' distils by LCD instead."),
    lcm_lora_scale: float = typer.Option(1.0, "--lcm-lora-scale", help="sd15: weight of the LCM-LoRA in the merge."),
    vae: str = typer.Option("full", "--vae", help="sd15: the transform's VAE: 'full' (the checkpoint's AutoencoderKL) or TAESD, a diffusers AutoencoderTiny dir or hub id (madebyollin/taesd)."),
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
            branches=branches, precision=precision, pool_size=pool_size, coreset_ratio=coreset, bank_rows=bank_rows,
            image_size=image_size, stats_weight=stats_weight, brightness=brightness, search_dims=search_dims,
            search_precision=search_precision,
            threshold_quantile=quantile, force=force, progress=progress,
            personalize_steps=personalize_steps, distill_steps=distill_steps, base_model=base_model,
            encoder_checkpoint=encoder_checkpoint,
            lcm_lora=None if lcm_lora is None else ("" if lcm_lora.lower() in ("none", "") else lcm_lora),
            lcm_lora_scale=lcm_lora_scale, vae=vae))
    except typer.Exit:
        raise
    except (FileExistsError, *USER_ERRORS) as exc:
        fail(str(exc))
    m = summary.manifest
    typer.echo(f"wrote {summary.bundle} ({summary.bytes / 1e6:.1f} MB, {m['precision']}, threshold {m['threshold']['value']:.4f})")
    for name, entry in m["models"].items():
        typer.echo(f"  {name}: max |onnx - torch| = {max(entry['validation'].values()):.2e} "
                   f"(tolerance {entry['tolerance']:.0e} x max(1, max |torch output|))")
    typer.echo(f"  runtime vs offline scores: max |diff| = {summary.parity['max_abs']:.2e} on {summary.parity['n']} images")
    typer.echo("  wall s: " + ", ".join(f"{k} {v:.1f}" for k, v in summary.wall_s.items()))
    if trt:
        _build_engines(summary.bundle, precision)


def _build_engines(bundle: Path, precision: str | None) -> None:
    from o2n_edge.export.tensorrt_build import (
        EngineBuildError,
        TensorRTUnavailable,
        build_engines,
    )

    try:
        reports = build_engines(bundle, precision=precision)
    except (TensorRTUnavailable, EngineBuildError, *USER_ERRORS) as exc:
        fail(str(exc))
    for name, rep in reports.items():
        typer.echo(f"  engine {name}: {rep}")


@app.command("build-engines")
def build_engines_cmd(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp16 or fp32 TensorRT engines (default: the bundle's precision; TensorRT 11 builds only that)."),
) -> None:
    """Build TensorRT engines for a bundle on this device (cached by onnx hash, TensorRT version, GPU and profile)."""
    _build_engines(bundle, precision)


def _settings_line(m: dict) -> str | None:
    """The detection settings a bundle scores with, in one line for ``inspect``."""
    enc = m.get("encoder")
    if not enc:
        return None
    tiling = enc.get("tiling") or {}
    tiles = f" in {tiling['tiles']}x{tiling['tiles']} tiles" if tiling.get("tiles", 1) > 1 else ""
    line = (f"{enc.get('kind', enc.get('encoder'))} at {m.get('image_size')} px{tiles}, layers {enc.get('layers', '?')}, "
            f"aggregation {enc.get('aggregation', '?')}, statistics weight {m.get('scoring', {}).get('stats_weight', 0)}, "
            f"border rings {m.get('scoring', {}).get('border_fraction', 0)}, "
            f"global cosine weight {m.get('scoring', {}).get('global_weight', '?')}, "
            f"JPEG draft {m.get('decode', {}).get('jpeg_draft', False)}, "
            f"search {m.get('scoring', {}).get('search_precision', 'float32')} on a CPU")
    return line


def _lineage_line(m) -> str | None:
    """Where a learned bundle came from (``o2n-edge learn``), in one line; None for an exported one."""
    lin = m.lineage
    if lin is None:
        return None
    rules: dict[str, int] = {}
    for a in lin.added or []:
        rules[str(a.get("rule"))] = rules.get(str(a.get("rule")), 0) + 1
    t = lin.threshold or {}
    return (f"learned {lin.created_at} from parent {lin.parent_hash[:16]}… ({lin.parent_path}): "
            f"{len(lin.added or [])} images added ({', '.join(f'{n} {r}' for r, n in rules.items()) or 'none'}), "
            f"{len(lin.earlier or [])} by earlier generations, {len(lin.calibration or [])} held out for calibration, "
            f"{len(lin.skipped or [])} skipped; threshold "
            + ("recalibrated" if t.get("recalibrated") else "kept from the parent"))


@app.command("inspect")
def inspect_cmd(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest summary as JSON."),
) -> None:
    """What is inside a bundle and whether it verifies (exit 1 when it does not)."""
    from o2n_edge.runtime.bundle import verify_bundle
    from o2n_edge.runtime.manifest import BundleManifest, read_manifest_json

    problems = verify_bundle(bundle)
    try:  # lenient: a refused bundle still shows what its manifest says
        m, _ = BundleManifest.check(read_manifest_json(bundle))
    except Exception as exc:  # a bundle without a readable manifest: report, do not crash
        m = BundleManifest(files={})
        problems = problems or [str(exc)]
    engines = sorted(p.name for p in (bundle / "engines").glob("*.plan")) if (bundle / "engines").is_dir() else []
    diffusion = m.diffusion or {}

    def tensors(specs: dict | None) -> dict | None:
        return None if specs is None else {n: t.to_dict() for n, t in specs.items()}

    info = {
        "bundle": str(bundle), "verified": not problems, "problems": problems,
        "profile": m.profile, "category": m.category, "precision": m.precision,
        "image_size": m.image_size, "diffusion_image_size": m.diffusion_image_size,
        "branches": list(m.branches) if m.scoring is not None else None,
        "threshold": m.threshold.value if m.threshold is not None else None,
        "steps": m.steps, "steps_run": m.steps_run, "strength": m.strength,
        "shots": m.shots.to_dict() if m.shots is not None else None,
        "memory_bank": m.memory_bank.to_dict() if m.memory_bank is not None else None,
        "student": diffusion.get("student"), "vae": diffusion.get("vae"),
        "models": {k: {"precision": v.precision, "inputs": tensors(v.inputs), "outputs": tensors(v.outputs),
                       "validation": v.validation} for k, v in (m.models or {}).items()},
        "files": {k: {"bytes": v.bytes, "sha256": v.sha256} for k, v in m.files.items()},
        "engines": engines, "versions": m.versions,
        "settings": _settings_line(m.to_dict()),
        "lineage": _lineage_line(m),
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
                    "threshold", "steps", "steps_run", "strength", "student", "vae", "shots", "memory_bank",
                    "settings", "lineage"):
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


