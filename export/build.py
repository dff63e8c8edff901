"""`o2n-edge export`: shots -> (personalize -> distil -> pool) -> ONNX graphs + reference -> bundle.

Stages, each resumable: the personalized run is cached in ``runs_dir`` (personalize resumes from
its checkpoints), every ONNX graph is exported into a work directory with an input-hash sidecar
and skipped when current, and the bundle is written atomically at the end. After writing, the
bundle is loaded by the torch-free runtime and its scores (ONNX encoder, the bundle's constants)
are compared with the export's own (torch encoder, the same numpy scoring) on held-out good
images (the parity check), so a bundle that scores differently never ships silently.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from o2n_edge.data import Dataset, load_dataset, load_image, sample_shots
from o2n_edge.profiles import get_profile, parse_branches, with_options

log = logging.getLogger("o2n_edge.export")

MAX_BANK_ROWS = 50_000  # memory-bank bound applied by default (coreset above it)
THRESHOLD_QUANTILE = 0.99  # of held-out good images' scores
MAX_CALIBRATION_IMAGES = 64
PARITY_IMAGES = 4


@dataclass
class ExportOptions:
    """Everything `o2n-edge export` takes; defaults are the profile's."""

    category: str
    out: Path
    profile: str = "lite"
    data: Path | None = None
    dataset: str | None = None
    shots: int = 4
    seed: int = 0
    run_dir: Path | None = None
    runs_dir: Path = Path("runs")
    branches: str | None = None
    precision: str = "fp32"
    pool_size: int | None = None
    coreset_ratio: float | None = None
    image_size: int | None = None  # encoder input side (None = the profile's; lite: 224 is the fast setting)
    stats_weight: float | None = None  # global statistics branch weight (None = the profile's)
    threshold_quantile: float = THRESHOLD_QUANTILE
    force: bool = False
    progress: bool = True
    work_dir: Path | None = None
    personalize_steps: int | None = None
    distill_steps: int | None = None
    base_model: Path | str | None = None  # sd15: local diffusers checkpoint or hub id
    encoder_checkpoint: Path | str | None = None  # sd15: local open_clip checkpoint, pretrained tag or hf-hub: id
    # sd15 student: None = the profile's LCM-LoRA (merged with the personalization LoRA); "" = LCD
    lcm_lora: str | None = None
    lcm_lora_scale: float = 1.0
    vae: str | None = None  # sd15: the transform's VAE: None/"full" = the checkpoint's, else a TAESD dir or hub id


@dataclass
class ExportSummary:
    """What the user is told at the end (and what tests check)."""

    bundle: Path
    manifest: dict
    wall_s: dict[str, float] = field(default_factory=dict)
    parity: dict[str, float] = field(default_factory=dict)
    bytes: int = 0


def _say(progress: bool, msg: str) -> None:
    if progress:
        from rich.console import Console

        Console(stderr=True).print(f"[bold cyan]export[/] {msg}", highlight=False)


def calibration_images(ds: Dataset, shot_paths: list[Path]) -> list[Path]:
    """Held-out good images for the threshold: the validation set, else unused training images."""
    pool = list(ds.val_good) if ds.val_good else [p for p in ds.train_good if p not in set(shot_paths)]
    if not pool:
        raise ValueError("no held-out good image to calibrate the threshold on: use fewer --shots")
    return pool[:MAX_CALIBRATION_IMAGES]


def export_bundle(opts: ExportOptions) -> ExportSummary:
    """Run the whole export; returns a summary. Raises ValueError-family errors for user mistakes."""
    from o2n_edge.encoders import build_encoder, encode_images
    from o2n_edge.evaluation import text_features_for
    from o2n_edge.export.bundle_writer import BundleWriter
    from o2n_edge.reference import augment_views, build_reference
    from o2n_edge.runtime.scoring import ScoringConfig, score, scoring_manifest

    walls: dict[str, float] = {}
    t_all = time.perf_counter()
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
    profile = with_options(profile, image_size=opts.image_size, stats_weight=opts.stats_weight)
    branches = parse_branches(opts.branches, profile)
    if opts.pool_size and "pool" in branches:  # a generated pool needs a diffusion model (lite has none)
        profile.require_diffusion("--pool-size")
    config = ScoringConfig.from_profile(profile, branches)
    out = Path(opts.out)
    if out.exists() and not opts.force:
        raise FileExistsError(f"{out} exists: pass --force to replace it")
    work = Path(opts.work_dir) if opts.work_dir else out.parent / f".{out.name}.work"
    work.mkdir(parents=True, exist_ok=True)

    ds = load_dataset(opts.data, opts.dataset, opts.category)
    shot_paths = sample_shots(ds.train_good, opts.shots, opts.seed)
    calib_paths = calibration_images(ds, shot_paths)
    encoder = build_encoder(profile.encoder)
    size = encoder.input_size
    draft = bool(profile.jpeg_draft)
    shot_imgs = [load_image(p, size, draft) for p in shot_paths]

    # --pool-size 0 is the shots-only bank: no diffusion model needed (0 must not fall back to the
    # default); a profile without a diffusion model (lite) generates no pool by default.
    default_pool = profile.diffusion.pool_size if profile.has_diffusion else 0
    n_pool_wanted = default_pool if opts.pool_size is None else opts.pool_size
    needs_diffusion = "personalized" in branches or ("pool" in branches and n_pool_wanted > 0)
    if needs_diffusion:
        profile.require_diffusion("a generated pool (--pool-size) or the personalized branch")
    run = None
    pool_imgs = None
    if needs_diffusion:
        from o2n_edge.diffusion import generate_pool, load_run
        from o2n_edge.personalized_eval import ensure_run

        t = time.perf_counter()
        lcm = profile.diffusion.lcm_lora if opts.lcm_lora is None else opts.lcm_lora
        student_tag = "" if profile.diffusion.kind != "sd15" else ("-lcm" if lcm else "-lcd")
        run_dir = opts.run_dir or (opts.runs_dir / f"export-{ds.name}-{ds.category}-{profile.name}-k{opts.shots}-s{opts.seed}{student_tag}")
        if opts.run_dir is None:
            if lcm:  # a missing LCM-LoRA is refused before minutes of personalization, not after
                from o2n_edge.hub import resolve_lora

                resolve_lora(lcm)
            _say(opts.progress, f"personalizing and distilling on {len(shot_paths)} shots -> {run_dir}")
            walls.update(ensure_run(shot_paths, ds.category, profile, run_dir, opts.seed, opts.progress,
                                    opts.personalize_steps, opts.distill_steps,
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

            _say(opts.progress, f"using TAESD ({opts.vae}) as the transform's VAE")
            use_taesd(run.models, opts.vae)
        walls["load_run"] = round(time.perf_counter() - t, 2)
        n_pool = n_pool_wanted
        if "pool" in branches and n_pool > 0:
            t = time.perf_counter()
            _say(opts.progress, f"generating an anomaly-free pool of {n_pool} images")
            pool_imgs = generate_pool(run, n_pool, seed=opts.seed, progress=opts.progress)
            walls["pool"] = round(time.perf_counter() - t, 2)

    # -- reference: banks, text features, standardization ------------------------------------
    t = time.perf_counter()
    _say(opts.progress, "building the reference (memory bank, text features, constants)")
    from o2n_edge.data.preprocess import resize_uint8

    shot_feats = [encode_images(encoder, augment_views(im)) for im in shot_imgs]
    pool_feats = encode_images(encoder, resize_uint8(pool_imgs, size)) if pool_imgs is not None else None
    text_features = text_features_for(encoder, ds.category) if "text" in branches else None
    shot_normal = None
    normal_of = None
    if "personalized" in branches:
        from o2n_edge.diffusion import one_to_normal

        def normal_of(images: np.ndarray) -> np.ndarray:
            return resize_uint8(one_to_normal(run, images, seed=opts.seed).normals, size)

        shot_normal = encode_images(encoder, normal_of(np.stack(shot_imgs)))
    fusion_choice = {"method": "profile default (the paper's weights)"}
    reference = build_reference(shot_feats, config, text_features, pool_feats, shot_normal)
    bank_rows = int(reference.memory_bank.shape[0])
    coreset_info = {"ratio": 1.0, "rows_before": bank_rows, "rows_after": bank_rows}
    wanted = opts.coreset_ratio if opts.coreset_ratio is not None else profile.coreset_ratio
    if (wanted is not None and wanted < 1.0) or bank_rows > MAX_BANK_ROWS:
        from o2n_edge.export.coreset import greedy_coreset

        ratio = wanted if wanted is not None and wanted < 1.0 else min(1.0, MAX_BANK_ROWS / bank_rows)
        _say(opts.progress, f"coreset: keeping {ratio:g} of {bank_rows} memory-bank rows")
        idx = greedy_coreset(reference.memory_bank, ratio, seed=opts.seed, max_rows=MAX_BANK_ROWS)
        reference.memory_bank = reference.memory_bank[idx]
        coreset_info = {"ratio": float(ratio), "rows_before": bank_rows, "rows_after": int(len(idx)),
                        "method": "greedy k-center (PatchCore), random projection to 128 dims"}
    walls["reference"] = round(time.perf_counter() - t, 2)

    # -- threshold on held-out good images (torch encoder, the runtime's scoring) -------------
    t = time.perf_counter()
    _say(opts.progress, f"calibrating the threshold on {len(calib_paths)} held-out good images")
    calib_imgs = [load_image(p, size, draft) for p in calib_paths]
    calib_feats = encode_images(encoder, calib_imgs)
    calib_normal = encode_images(encoder, normal_of(np.stack(calib_imgs))) if normal_of else None
    calib_scores = score(calib_feats, reference, config, calib_normal).scores
    threshold = float(np.quantile(calib_scores, opts.threshold_quantile))
    walls["calibrate"] = round(time.perf_counter() - t, 2)

    # -- ONNX graphs ----------------------------------------------------------------------------
    t = time.perf_counter()
    models = _export_graphs(encoder, run, branches, opts.precision, work, shot_imgs, opts)
    walls["export_onnx"] = round(time.perf_counter() - t, 2)

    # -- bundle ---------------------------------------------------------------------------------
    t = time.perf_counter()
    manifest = {
        "profile": profile.name,
        "category": ds.category,
        "dataset": ds.name,
        "image_size": size,
        "decode": {"jpeg_draft": draft},
        "precision": opts.precision,
        "shots": {"images": [p.name for p in shot_paths], "seed": opts.seed, "k": opts.shots},
        "encoder": encoder.describe(),
        "scoring": scoring_manifest(config, reference),
        "fusion": {"weights": dict(config.weights), "norm": {k: list(v) for k, v in reference.norm.items()},
                   "selection": fusion_choice},
        "memory_bank": {"rows": int(reference.memory_bank.shape[0]), "dim": int(reference.memory_bank.shape[1]),
                        "coreset": coreset_info, "pool_size": 0 if pool_imgs is None else int(len(pool_imgs))},
        "threshold": {"value": threshold, "method": "quantile of held-out good images' scores",
                      "quantile": opts.threshold_quantile, "n_images": len(calib_paths),
                      "images": [p.name for p in calib_paths]},
        "models": {name: rep.manifest_entry() for name, (rep, _) in models.items()},
    }
    if run is not None and "personalized" in branches:
        from o2n_edge.diffusion import transform_noise, transform_plan
        from o2n_edge.diffusion.taesd import vae_record
        from o2n_edge.diffusion.transform import lcm_scheduler
        from o2n_edge.export.scheduler_tables import lcm_tables

        plan = transform_plan(run)
        m = run.models
        lat = [int(m.latent_channels), run.image_size // int(m.vae_scale), run.image_size // int(m.vae_scale)]
        manifest.update({
            "diffusion_image_size": run.image_size,
            "prompt": run.prompt,
            "strength": plan["strength"],
            "steps": plan["num_inference_steps"],
            "steps_run": plan["steps_run"],
            "scheduler": lcm_tables(lcm_scheduler(run)),
            "transform": {"strength": plan["strength"], "steps": plan["num_inference_steps"],
                          "steps_run": plan["steps_run"], "timesteps": [int(x) for x in plan["timesteps"]],
                          "strength_mode": "lcm", "seed": opts.seed},
            "diffusion": {"kind": run.spec.kind, "latent_shape": lat, "distill": run.distill_info.get("distances", {}),
                          "student": student_record(run.distill_info), "vae": vae_record(m.vae)},
        })
        noise = transform_noise(tuple(lat), plan["steps_run"] - 1, opts.seed)
        noises = np.stack([noise["init"].numpy(), *[n.numpy() for n in noise["steps"]]]).astype(np.float32)
    with BundleWriter(out, force=opts.force) as w:
        for name, (rep, path) in models.items():
            w.add_file(f"{name}.onnx", path)
        w.add_array("memory_bank", reference.memory_bank.astype(np.float32))
        w.add_array("global_bank", reference.global_bank.astype(np.float32))
        if reference.text_features is not None:
            w.add_array("text_features", reference.text_features.astype(np.float32))
        if config.stats_weight > 0:
            w.add_array("stats_bank", reference.stats_bank.astype(np.float32))
            w.add_array("stats_scale", reference.stats_scale.astype(np.float32))
        if run is not None and "personalized" in branches:
            w.add_array("prompt_embeds", run.prompt_embeds.detach().float().cpu().numpy())
            w.add_array("transform_noise", noises)
        final = w.write_manifest(manifest)
    walls["bundle"] = round(time.perf_counter() - t, 2)

    # -- parity: the torch-free runtime vs the export's own scores ------------------------------
    t = time.perf_counter()
    parity = check_parity(out, calib_imgs[:PARITY_IMAGES], calib_scores[:PARITY_IMAGES])
    walls["parity"] = round(time.perf_counter() - t, 2)
    walls["total"] = round(time.perf_counter() - t_all, 2)
    size_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return ExportSummary(bundle=out, manifest=final, wall_s=walls, parity=parity, bytes=size_bytes)


def student_record(distill_info: dict) -> dict:
    """How the few-step UNet was made (LCM-LoRA merge or distillation), for the manifest."""
    keys = ("method", "steps", "lcm_lora", "lcm_lora_scale", "personal_lora_scale", "num_inference_steps")
    return {k: distill_info[k] for k in keys if k in distill_info}


def _export_graphs(encoder, run, branches, precision: str, work: Path, shot_imgs: list[np.ndarray],
                   opts: ExportOptions) -> dict:
    """Export (or reuse) every graph the branches need; returns name -> (report, path)."""
    import torch

    from o2n_edge.export.onnx_export import export_onnx
    from o2n_edge.export.specs import image_encoder_spec, unet_spec, vae_decoder_spec, vae_encoder_spec

    graphs = {}
    spec = image_encoder_spec(encoder)
    real = (encoder.preprocess(shot_imgs[:2]),)
    graphs["image_encoder"] = spec, spec.wrap(encoder), real
    if run is not None and "personalized" in branches:
        from o2n_edge.diffusion.models import images_to_tensor, resize_images

        m = run.models
        unet = run.unet_for(True)
        lat = run.image_size // int(m.vae_scale)
        pe = run.prompt_embeds.detach().float()
        pixels = images_to_tensor(resize_images(np.stack(shot_imgs[:2]), run.image_size)).float()
        venc = vae_encoder_spec(m.vae, run.image_size)
        vdec = vae_decoder_spec(m.vae, lat)
        uspec = unet_spec(unet, int(pe.shape[1]), int(pe.shape[2]), lat)
        enc_w = venc.wrap(m.vae)
        with torch.no_grad():
            latents = enc_w(pixels)
        graphs["vae_encoder"] = venc, enc_w, (pixels,)
        graphs["vae_decoder"] = vdec, vdec.wrap(m.vae), (latents,)
        ts = torch.full((latents.shape[0],), 299.0)
        graphs["unet"] = uspec, uspec.wrap(unet), (latents, ts, pe.expand(latents.shape[0], -1, -1))
    out = {}
    for name, (spec, wrapper, real_inputs) in graphs.items():
        _say(opts.progress, f"exporting {name} ({precision})")
        path = work / f"{name}.onnx"
        rep = export_onnx(wrapper.float(), spec, path, precision, force=opts.force, real_inputs=real_inputs)
        out[name] = (rep, path)
    return out


def check_parity(bundle: Path, images: list[np.ndarray], reference_scores: np.ndarray) -> dict[str, float]:
    """Score ``images`` with the torch-free runtime; max |runtime - export| over them.

    Both score with the same numpy code, so a difference comes from the ONNX encoder graphs or
    from a constant that did not reach the bundle.
    """
    from o2n_edge.runtime.pipeline import OrtPipeline

    pipe = OrtPipeline(bundle)
    got = np.array([r.score for r in pipe.inspect_batch(images)])
    diff = np.abs(got - np.asarray(reference_scores))
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "n": len(images),
            "reference": [float(x) for x in reference_scores], "runtime": [float(x) for x in got]}
