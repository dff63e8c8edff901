"""Few-step student: latent consistency distillation (LCD) of the personalized UNet, or an LCM-LoRA merge.

The transform must run in a handful of UNet evaluations on a line-side device, so the personalized
model (teacher) is distilled into a consistency model that LCMScheduler samples in 1-4 steps.

- Every profile: LCD (Luo et al. 2023, "Latent Consistency Models"; the reference is diffusers'
  ``examples/consistency_distillation/train_lcm_distill_sd_wds.py``): a noisy latent at
  ``t_{n+k}`` goes one DDIM-solver step (skip k = 20 on a 50-step grid) with the teacher to
  ``t_n``; the student's consistency function at ``t_{n+k}`` is pulled towards the target's at
  ``t_n`` (boundary conditions c_skip/c_out, sigma_data 0.5, timestep scaling 10 - the numbers
  LCMScheduler uses). No CFG on the shots, so guidance is 1 and the UNet takes no w-embedding.
  tiny: the student is a full copy of the teacher with an EMA target (decay 0.95); sd15: a
  LoRA on the teacher (the LCM-LoRA recipe), whose target is the student itself without grad.
- sd15 with ``lcm_lora``: load a pretrained LCM-LoRA and the personalization LoRA as two adapters
  with their weights, fuse; optional LCD steps then fine-tune the merged student with a LoRA.

The distance between the student's 1/2/4-step outputs and the teacher's 50-step DDIM outputs from
the same noised latents at the transform strength is measured and written to distill.json. The LCD
training loop itself is in :mod:`o2n_edge.diffusion.lcd`.
"""

from __future__ import annotations

import copy
import hashlib
import math
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from o2n_edge._lazy import require
from o2n_edge.diffusion.augment import augment
from o2n_edge.diffusion.lcd import (
    CHECKPOINT_FORMAT,
    EMA_DECAY,
    NUM_DDIM_TIMESTEPS,
    TRANSFORM_FOCUS,
    DistillConfig,
    train_lcd,
)
from o2n_edge.diffusion.models import (
    build_models,
    decode_latents,
    encode_latents,
    images_to_tensor,
    resize_images,
    save_unet_lora,
)
from o2n_edge.diffusion.run_dir import (
    LoadedRun,
    RunDir,
    atomic_dir,
    load_run,
    read_json,
    versions,
    write_json_atomic,
)
from o2n_edge.diffusion.transform import (
    TEACHER_STEPS,
    ddim_denoise,
    ddim_timesteps,
    lcm_denoise,
    lcm_scheduler,
    lcm_timesteps,
    transform_noise,
)

DISTILL_CHECKPOINTS = "distill_checkpoints"  # = RunDir.distill_checkpoints
BATCH_SIZE = {"tiny": 4, "sd15": 2}
EVAL_STEPS = (1, 2, 4)
EVAL_AUGMENTED = 4  # augmented views added to the shots for the distance measurement
EVAL_SEED = 1234


def _torch() -> Any:
    return require("torch", "distillation")


def _run_sha(rd: RunDir) -> str:
    return hashlib.sha256(rd.run_json.read_bytes()).hexdigest()[:16]


def _device(device: str | None) -> Any:
    torch = _torch()
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _merge_lcm_lora(run: LoadedRun, lcm_lora: Path, lcm_scale: float, personal_scale: float) -> Any:
    """Base UNet + LCM-LoRA (adapter "lcm") + personalization LoRA (adapter "personal"), fused."""
    diffusers = require("diffusers", "the LCM-LoRA merge")
    lcm_lora = Path(lcm_lora)
    models = build_models(run.spec)
    pipe = diffusers.StableDiffusionPipeline(
        vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer, unet=models.unet,
        scheduler=lcm_scheduler(run),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    with warnings.catch_warnings():
        # peft warns that a second adapter joins the first: that is the point here.
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        if lcm_lora.is_file():
            pipe.load_lora_weights(str(lcm_lora.parent), weight_name=lcm_lora.name, adapter_name="lcm")
        else:
            pipe.load_lora_weights(str(lcm_lora), adapter_name="lcm")
        pipe.load_lora_weights(str(RunDir(run.run_dir).lora), adapter_name="personal")
    pipe.set_adapters(["lcm", "personal"], adapter_weights=[lcm_scale, personal_scale])
    pipe.fuse_lora(adapter_names=["lcm", "personal"], lora_scale=1.0)
    pipe.unload_lora_weights()
    return models.unet


def distill(
    run_dir: Path,
    steps: int | None = None,
    num_inference_steps: int = 4,
    lcm_lora: Path | str | None = None,
    lcm_lora_scale: float = 1.0,
    personal_lora_scale: float = 1.0,
    progress: bool = True,
    seed: int = 0,
    resume: bool = True,
    checkpoint_every: int | None = None,
    device: str | None = None,
    measure: bool = True,
) -> Path:
    """Distil the run's personalized UNet into a few-step student at ``run_dir/student``.

    ``steps`` LCD optimizer steps (default ``spec.distill_steps``; sd15 with ``lcm_lora``: 0, i.e.
    merge only). ``num_inference_steps`` is recorded as the student's intended step count and is
    always part of the measured 1/2/4. Returns the student dir. Writes ``distill.json``.
    """
    torch = _torch()
    t0, c0 = time.time(), time.process_time()
    rd = RunDir(Path(run_dir))
    read_json(rd.run_json)
    dev = _device(device)
    run = load_run(rd.root, load_student=False, device=str(dev))
    spec = run.spec
    if lcm_lora is not None and spec.kind != "sd15":
        raise ValueError("--lcm-lora applies to the sd15 profile only (tiny distils by LCD)")
    lcm_file = None
    if lcm_lora is not None:  # a local file/dir or a hub id (latent-consistency/lcm-lora-sdv1-5)
        from o2n_edge.hub import resolve_lora

        lcm_file = resolve_lora(str(lcm_lora))
    if steps is None:
        steps = 0 if lcm_lora is not None else spec.distill_steps
    steps = int(steps)
    teacher = run.models.unet.to(dev).eval().requires_grad_(False)
    vae = run.models.vae.to(dev)
    if spec.kind == "sd15":
        require("peft", "sd15 distillation")
        student = (_merge_lcm_lora(run, lcm_file, lcm_lora_scale, personal_lora_scale)
                   if lcm_lora is not None else copy.deepcopy(teacher))
        student = student.to(dev)
        mode = "lora"
    else:
        student = copy.deepcopy(teacher)
        mode = "full"
    cfg = DistillConfig(
        run_sha=_run_sha(rd), kind=spec.kind, lcm_lora=str(lcm_lora or ""),
        lcm_lora_scale=float(lcm_lora_scale), personal_lora_scale=float(personal_lora_scale),
        seed=seed, batch_size=BATCH_SIZE[spec.kind], student=mode,
    )
    losses: list[float] = []
    train_s = 0.0
    start = 0
    if steps > 0:
        ckpt_dir = rd.root / DISTILL_CHECKPOINTS
        ckpt = _latest(ckpt_dir) if resume else None
        if ckpt is not None and (ckpt.get("format") != CHECKPOINT_FORMAT or ckpt.get("config") != asdict(cfg)):
            ckpt = None
        if not resume or ckpt is None:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        start, losses, train_s = train_lcd(
            run, teacher, student, vae, cfg, steps, ckpt, ckpt_dir,
            checkpoint_every or max(10, steps // 5), dev, progress,
        )
    student.eval().requires_grad_(False)
    # From here the old student is being replaced: its distill.json must not outlive it.
    rd.distill_json.unlink(missing_ok=True)
    shutil.rmtree(rd.student_lora, ignore_errors=True)
    if mode == "lora" and steps > 0:
        with atomic_dir(rd.student_lora) as tmp:
            save_unet_lora(student, tmp)
        student.fuse_lora()
        student.unload_lora()
    with atomic_dir(rd.student_unet) as tmp:
        student.to("cpu").save_pretrained(tmp)
    student.to(dev)

    # measure=False skips the 50-step teacher comparison (minutes per image for a CPU-bound real-size
    # dry run whose random weights make the distances meaningless anyway)
    distances = (measure_distances(run, student, device=dev, strength=spec.strength, progress=progress)
                 if measure else {})
    info = {
        "kind": spec.kind,
        "method": ("lcm_lora_merge" + ("+lcd" if steps else "")) if lcm_lora is not None else "lcd",
        "student": mode,
        "steps": steps,
        "resumed_from": start,
        "num_inference_steps": int(num_inference_steps),
        "strength": spec.strength,
        "lcm_lora": str(lcm_lora or ""),
        "lcm_lora_file": str(lcm_file or ""),
        "lcm_lora_scale": lcm_lora_scale,
        "personal_lora_scale": personal_lora_scale,
        "seed": seed,
        "batch_size": cfg.batch_size,
        "ema_decay": EMA_DECAY if mode == "full" else 0.0,
        "num_ddim_timesteps": NUM_DDIM_TIMESTEPS,
        "transform_focus": TRANSFORM_FOCUS,
        "losses": {"first": losses[0], "last": float(np.mean(losses[-max(1, len(losses) // 10):])),
                   "n": len(losses)} if losses else {},
        "distances": distances,
        "train_s": round(train_s, 2),
        "wall_s": round(time.time() - t0, 2),
        "cpu_s": round(time.process_time() - c0, 2),
        "threads": torch.get_num_threads(),
        "device": str(dev),
        "versions": versions(),
    }
    write_json_atomic(rd.distill_json, info)
    return rd.student


def _latest(ckpt_dir: Path) -> dict[str, Any] | None:
    torch = _torch()
    found = sorted(ckpt_dir.glob("step_*.pt")) if ckpt_dir.is_dir() else []
    return torch.load(found[-1], map_location="cpu", weights_only=False) if found else None


# --------------------------------------------------------------------------------------------
# Student-vs-teacher distance
# --------------------------------------------------------------------------------------------


def _psnr(mse: float) -> float:
    return float(10 * math.log10(1.0 / mse)) if mse > 0 else float("inf")


def measure_distances(run: LoadedRun, student: Any, device: Any = None, strength: float | None = None,
                      eval_steps: tuple[int, ...] = EVAL_STEPS, teacher_steps: int = TEACHER_STEPS,
                      seed: int = EVAL_SEED, progress: bool = False,
                      images: np.ndarray | None = None) -> dict[str, Any]:
    """How far the few-step student lands from the teacher's 50-step DDIM result.

    Inputs: the shots plus a few augmented views, VAE-encoded (mean) and noised ONCE to the
    transform's first timestep; the teacher (DDIM, ``teacher_steps``) and the student
    (LCMScheduler, 1/2/4 steps) denoise the same noised latents. Reported per step count: latent
    MSE, pixel MSE (images in [0,1]) and PSNR of the decoded images vs the teacher's; the same for
    the *undistilled* teacher on the LCM schedule (the baseline distillation must beat), and the
    teacher's own PSNR to the clean input (how much the transform changes a normal image).

    ``images`` (uint8 (N,H,W,3)) replaces the shots, e.g. held-out normals: on the shots a model
    trained from scratch has memorized, every sampler lands on the same image and hides how much
    multi-step re-noising drifts from the query.
    """
    torch = _torch()
    strength = run.spec.strength if strength is None else strength
    dev = device or next(student.parameters()).device
    teacher, vae, sf = run.models.unet, run.models.vae, run.models.scaling_factor
    if images is not None:
        pixels = images_to_tensor(resize_images(images, run.spec.image_size))
        source = "images"
    else:
        pixels = images_to_tensor(run.shots)
        if EVAL_AUGMENTED:
            pixels = torch.cat([pixels, augment(run.shots, EVAL_AUGMENTED, seed=seed)])
        source = f"shots + {EVAL_AUGMENTED} augmented views"
    pixels = pixels.to(dev)
    lat = encode_latents(vae, pixels, sf).to(dev)
    sched = lcm_scheduler(run)
    first = lcm_timesteps(sched, 1, strength)[0]
    noise = transform_noise(tuple(lat.shape[1:]), max(eval_steps), seed)
    noisy = sched.add_noise(lat, noise["init"].to(dev).expand_as(lat), torch.tensor([first], device=dev))

    def to01(x: Any) -> Any:
        return (decode_latents(vae, x, sf).clamp(-1, 1) + 1) / 2

    ref_lat = ddim_denoise(teacher, noisy, ddim_timesteps(first, teacher_steps), run.prompt_embeds,
                           sched.alphas_cumprod)
    ref_pix = to01(ref_lat)
    clean_pix = (pixels.clamp(-1, 1) + 1) / 2
    out: dict[str, Any] = {
        "strength": float(strength),
        "noise_timestep": int(first),
        "teacher": f"DDIM {teacher_steps} steps",
        "images": int(len(pixels)),
        "source": source,
        "teacher_vs_input": {"pixel_mse": float(((ref_pix - clean_pix) ** 2).mean()),
                             "psnr": _psnr(float(((ref_pix - clean_pix) ** 2).mean()))},
        "vae_recon": {"psnr": _psnr(float(((to01(lat) - clean_pix) ** 2).mean()))},
        "student": {},
        "teacher_lcm": {},
    }
    for n in eval_steps:
        try:
            ts = lcm_timesteps(sched, n, strength)
        except ValueError:
            continue
        for name, net in (("student", student), ("teacher_lcm", teacher)):
            den = lcm_denoise(net, noisy, ts, run.prompt_embeds, sched, noise["steps"])
            pix = to01(den)
            pmse = float(((pix - ref_pix) ** 2).mean())
            out[name][str(n)] = {
                "timesteps": ts,
                "latent_mse": float(((den - ref_lat) ** 2).mean()),
                "pixel_mse": pmse,
                "psnr": _psnr(pmse),
            }
    return out
