"""Export stages before the reference: resolve the options, load the shots, personalize, generate a pool.

Why separate stages: the expensive parts (personalization and distillation: minutes to hours;
the generated pool) only run for the branches that need a diffusion model, and every user
mistake (a bad flag, an existing output, a missing LCM-LoRA) is refused here, before any of
that time is spent.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from o2n_edge.data import Dataset, load_dataset, load_image, sample_shots
from o2n_edge.export.export_state import ExportOptions, ExportPlan, ExportState, say
from o2n_edge.profiles import get_profile, parse_branches, with_options

MAX_CALIBRATION_IMAGES = 64


def calibration_images(ds: Dataset, shot_paths: list[Path]) -> list[Path]:
    """Held-out good images for the threshold: the validation set, else unused training images."""
    pool = list(ds.val_good) if ds.val_good else [p for p in ds.train_good if p not in set(shot_paths)]
    if not pool:
        raise ValueError("no held-out good image to calibrate the threshold on: use fewer --shots")
    return pool[:MAX_CALIBRATION_IMAGES]


def resolve_inputs(opts: ExportOptions) -> ExportPlan:
    """Check the options and apply them to the profile, so a mistake fails before any model loads.

    Also creates the work directory (exported graphs are cached there between runs) and refuses
    to overwrite an existing bundle without ``force``.
    """
    from o2n_edge.runtime.scoring import ScoringConfig

    if opts.precision not in ("fp32", "fp16"):
        raise ValueError(f"--precision must be fp32 or fp16, got {opts.precision!r}")
    if opts.coreset_ratio is not None and not 0.0 < opts.coreset_ratio <= 1.0:
        raise ValueError(f"--coreset must be a fraction in (0, 1] (1 = the whole bank), got {opts.coreset_ratio}")
    profile = get_profile(opts.profile)
    if opts.base_model is not None:
        profile = replace(profile, diffusion=replace(profile.require_diffusion("--base-model"),
                                                     base_model=str(opts.base_model)))
    if opts.encoder_checkpoint is not None:
        profile = replace(profile, encoder=replace(profile.encoder, checkpoint=str(opts.encoder_checkpoint)))
    profile = with_options(profile, image_size=opts.image_size, stats_weight=opts.stats_weight,
                           bank_rows=opts.bank_rows, brightness=opts.brightness, search_dims=opts.search_dims,
                           search_precision=opts.search_precision)
    branches = parse_branches(opts.branches, profile)
    if opts.pool_size and "pool" in branches:  # a generated pool needs a diffusion model (lite has none)
        profile.require_diffusion("--pool-size")
    config = ScoringConfig.from_profile(profile, branches)
    out = Path(opts.out)
    if out.exists() and not opts.force:
        raise FileExistsError(f"{out} exists: pass --force to replace it")
    work = Path(opts.work_dir) if opts.work_dir else out.parent / f".{out.name}.work"
    work.mkdir(parents=True, exist_ok=True)
    # --pool-size 0 is the shots-only bank: no diffusion model needed (0 must not fall back to the
    # default); a profile without a diffusion model (lite) generates no pool by default.
    default_pool = profile.diffusion.pool_size if profile.has_diffusion else 0
    pool_size = default_pool if opts.pool_size is None else opts.pool_size
    plan = ExportPlan(profile=profile, branches=branches, config=config, out=out, work=work, pool_size=pool_size)
    if plan.needs_diffusion:
        profile.require_diffusion("a generated pool (--pool-size) or the personalized branch")
    return plan


def load_shots(opts: ExportOptions, plan: ExportPlan) -> ExportState:
    """Draw the k shots (seeded) and the held-out calibration images, build the encoder, load the shots.

    The shots are drawn first so the calibration images are guaranteed disjoint from them.
    """
    from o2n_edge.encoders import build_encoder

    ds = load_dataset(opts.data, opts.dataset, opts.category)
    shot_paths = sample_shots(ds.train_good, opts.shots, opts.seed)
    calib_paths = calibration_images(ds, shot_paths)
    encoder = build_encoder(plan.profile.encoder)
    draft = bool(plan.profile.jpeg_draft)
    shot_imgs = [load_image(p, encoder.input_size, draft) for p in shot_paths]
    return ExportState(opts=opts, plan=plan, dataset=ds, shot_paths=shot_paths, calib_paths=calib_paths,
                       encoder=encoder, shot_imgs=shot_imgs)


def run_dir_for(state: ExportState, lcm: str | None) -> Path:
    """The cached personalized run: ``--run-dir`` or one directory per dataset/profile/shots/seed/student.

    The student tag keeps an LCM-LoRA run and a distilled (LCD) run of sd15 apart.
    """
    opts, profile, ds = state.opts, state.plan.profile, state.dataset
    if opts.run_dir:
        return opts.run_dir
    student_tag = "" if profile.diffusion.kind != "sd15" else ("-lcm" if lcm else "-lcd")
    return opts.runs_dir / f"export-{ds.name}-{ds.category}-{profile.name}-k{opts.shots}-s{opts.seed}{student_tag}"


def personalize(state: ExportState) -> None:
    """Personalize and distil on the shots (resumable, cached in ``runs_dir``), then load the run.

    Skipped when no branch needs a diffusion model (lite). The export runs the few-step student
    only, so the teacher UNet and the text encoder are dropped after loading.
    """
    if not state.plan.needs_diffusion:
        return
    from o2n_edge.diffusion import load_run
    from o2n_edge.personalized_eval import ensure_run

    opts, profile = state.opts, state.plan.profile
    with state.timed("load_run"):
        lcm = profile.diffusion.lcm_lora if opts.lcm_lora is None else opts.lcm_lora
        run_dir = run_dir_for(state, lcm)
        if opts.run_dir is None:
            if lcm:  # a missing LCM-LoRA is refused before minutes of personalization, not after
                from o2n_edge.hub import resolve_lora

                resolve_lora(lcm)
            say(opts.progress, f"personalizing and distilling on {len(state.shot_paths)} shots -> {run_dir}")
            state.walls.update(ensure_run(state.shot_paths, state.dataset.category, profile, run_dir, opts.seed,
                                          opts.progress, opts.personalize_steps, opts.distill_steps,
                                          lcm_lora=lcm or None, lcm_lora_scale=opts.lcm_lora_scale))
        run = load_run(run_dir, device="cpu")
        if run.student is not None and run.spec.kind == "sd15":
            # the export runs the student only: drop the teacher and the text encoder (3.4 + 0.5 GB
            # at SD-1.5 size; the prompt's hidden states are already in the run)
            run.models.unet, run.models.text_encoder = run.student, None
        if opts.vae and opts.vae != "full":
            if run.spec.kind != "sd15":
                raise ValueError("--vae applies to the sd15 profile only")
            from o2n_edge.diffusion.taesd import use_taesd

            say(opts.progress, f"using TAESD ({opts.vae}) as the transform's VAE")
            use_taesd(run.models, opts.vae)
        state.run = run


def generate_pool(state: ExportState) -> None:
    """Generate the anomaly-free pool that widens the memory bank beyond the k shots (pool branch)."""
    if state.run is None or "pool" not in state.plan.branches or state.plan.pool_size <= 0:
        return
    from o2n_edge.diffusion import generate_pool as diffusion_pool

    n_pool = state.plan.pool_size
    with state.timed("pool"):
        say(state.opts.progress, f"generating an anomaly-free pool of {n_pool} images")
        pool: np.ndarray = diffusion_pool(state.run, n_pool, seed=state.opts.seed, progress=state.opts.progress)
        state.pool_imgs = pool
