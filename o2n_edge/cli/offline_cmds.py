"""Offline-stage commands: evaluate, personalize, distil and look at the transform (need o2n-edge[build])."""

from __future__ import annotations

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
    parse_int_list,
    parse_shots,
    write_json,
)


@app.command("eval")
def eval_cmd(
    data: Optional[Path] = DataOpt,
    dataset: str = DatasetOpt,
    category: Optional[str] = typer.Option(None, "--category", help="Category to evaluate (e.g. hazelnut, pcb); 'textile' for the demo set."),
    shots: str = typer.Option("1,2,4", "--shots", help="Comma list of shot counts k (normal training images used); 'all' = every training good image (textile: its 100 training images; the bank stays within --bank-rows)."),
    seeds: str = typer.Option("0,1,2", "--seeds", help="Comma list of seeds; each seed draws different shots."),
    profile: str = ProfileOpt,
    branches: Optional[str] = typer.Option(None, "--branches", help="Comma list of personalized, pool, text (default: every branch the profile has that needs no personalized run, or all with --run/--personalize)."),
    run: Optional[Path] = typer.Option(None, "--run", help="A personalized run directory (from `o2n-edge personalize`), used for every shots/seed."),
    personalize: bool = typer.Option(False, "--personalize", help="Personalize and distil on the fly for every shots/seed (slow: minutes per run on CPU)."),
    pool_size: Optional[int] = typer.Option(None, "--pool-size", help="Generated images added to the memory bank (0 = shots only; default: the profile's)."),
    personalize_steps: Optional[int] = typer.Option(None, "--personalize-steps", help="With --personalize: optimizer steps per run (default: the profile's)."),
    distill_steps: Optional[int] = typer.Option(None, "--distill-steps", help="With --personalize: distillation steps per run (default: the profile's)."),
    split_csv: Optional[Path] = typer.Option(None, "--split-csv", help="VisA official split csv (default: <data>/split_csv/1cls.csv when present)."),
    image_size: Optional[int] = ImageSizeOpt,
    stats_weight: Optional[float] = StatsWeightOpt,
    brightness: Optional[str] = BrightnessOpt,
    coreset: Optional[float] = typer.Option(None, "--coreset", help="Score with this fraction of the memory bank, as an exported bundle does (greedy k-center; 1 = whole bank, up to --bank-rows); default: the profile's (lite 0.1)."),
    bank_rows: Optional[int] = BankRowsOpt,
    search_dims: Optional[int] = SearchDimsOpt,
    search_precision: Optional[str] = SearchPrecisionOpt,
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result document (per run and mean ± std) to this JSON file."),
    markdown_out: Optional[Path] = typer.Option(None, "--markdown", help="Also write the table as markdown to this file."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars on stderr."),
) -> None:
    """Few-shot evaluation: image AUROC/AP/F1-max (and pixel AUROC/PRO where masks exist), mean ± std over seeds."""
    try:
        from o2n_edge.data import load_dataset
        from o2n_edge.evaluation import evaluate
        from o2n_edge.profiles import get_profile, parse_branches, with_options
        from o2n_edge.eval_tables import markdown_table, print_table

        if dataset == "textile" and category is None:
            category = "textile"
        if category is None:
            fail("--category is required (e.g. --category hazelnut), except with --dataset textile")
        prof = with_options(get_profile(profile), image_size=image_size, stats_weight=stats_weight,
                            bank_rows=bank_rows, brightness=brightness, search_dims=search_dims,
                            search_precision=search_precision)
        if coreset is not None and not 0.0 < coreset <= 1.0:
            fail(f"--coreset must be a fraction in (0, 1] (1 = the whole bank), got {coreset}")
        ratio = coreset if coreset is not None else prof.coreset_ratio
        personalized_run = run is not None or personalize
        if personalized_run:
            prof.require_diffusion("--run" if run is not None else "--personalize")
        default_branches = (prof.default_branches if personalized_run
                            else tuple(b for b in prof.default_branches if b != "personalized"))
        chosen = parse_branches(branches, prof) if branches else default_branches
        ds = load_dataset(data, None if dataset == "auto" else dataset, category, split_csv=split_csv)
        provider = None
        if personalized_run:
            from o2n_edge.personalized_eval import make_normal_provider

            provider = make_normal_provider(ds, prof, run_dir=run, pool_size=pool_size, progress=progress,
                                            personalize_steps=personalize_steps, distill_steps=distill_steps)
        elif "personalized" in chosen:
            fail("--branches personalized needs --run RUN_DIR or --personalize")
        result = evaluate(ds, prof, parse_shots(shots), parse_int_list(seeds, "--seeds"), chosen,
                          normal_provider=provider, progress=progress,
                          coreset=ratio if ratio is not None and ratio < 1.0 else None)
    except typer.Exit:
        raise
    except USER_ERRORS as exc:
        fail(str(exc))
    print_table([result])
    if result.get("setting"):
        typer.echo(f"setting: {result['setting']} (fixed)")
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
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (defaults: tiny 30, sd15 800; lite has no diffusion model)."),
    base_model: Optional[str] = typer.Option(None, "--base-model", envvar="O2N_SD15", help="sd15: SD-1.5 diffusers checkpoint, a local directory or a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5 (default: $O2N_SD15)."),
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
        spec = prof.require_diffusion("personalize")
        spec = replace(spec, base_model=str(base_model)) if base_model else spec
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
    steps: Optional[int] = typer.Option(None, "--steps", help="Consistency-distillation steps (defaults: tiny 20, sd15 1000)."),
    inference_steps: Optional[int] = typer.Option(None, "--inference-steps", help="Few-step target (1-8; default: the profile's)."),
    lcm_lora: Optional[str] = typer.Option(None, "--lcm-lora", help="sd15: merge this pretrained LCM-LoRA (local file or hub id, e.g. latent-consistency/lcm-lora-sdv1-5) instead of distilling."),
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
    out: Path = typer.Option(..., "--out", help="Directory for query | normal version | difference PNGs."),
    grid: Optional[Path] = typer.Option(None, "--grid", help="Also write every row stacked into this one PNG."),
    strength: Optional[float] = typer.Option(None, "--strength", help="Noise strength (default: the profile's)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="LCM steps (default: the profile's)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the transform noise (deterministic)."),
    teacher: bool = typer.Option(False, "--teacher", help="Run the many-step DDIM teacher instead of the student (quality reference)."),
) -> None:
    """Write each query beside its normal version and their difference, so a person can look at them."""
    try:
        import numpy as np
        from PIL import Image

        from o2n_edge.data import load_image
        from o2n_edge.diffusion import load_run, one_to_normal
        from o2n_edge.diffusion.transform import DIFF_GAIN, transform_panel

        loaded = load_run(run)
        out.mkdir(parents=True, exist_ok=True)
        size = loaded.image_size
        rows = []
        for path in images:
            q = load_image(path, size)
            res = one_to_normal(loaded, q[None], strength=strength, steps=steps, seed=seed, use_student=not teacher)
            rows.append(transform_panel(q, res.normals[0]))
            target = out / f"{path.stem}_normal.png"
            Image.fromarray(rows[-1]).save(target)
            typer.echo(f"{target}  ({res.unet}, {res.scheduler}, {res.steps_run} steps run at strength {res.strength})")
        if grid is not None:
            grid.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.concatenate(rows, axis=0)).save(grid)
            typer.echo(f"{grid}  (query | normal version | difference x{DIFF_GAIN:g}, {len(rows)} rows)")
    except typer.Exit:
        raise
    except USER_ERRORS as exc:
        fail(str(exc))


