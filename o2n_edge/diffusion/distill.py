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
the same noised latents at the transform strength is measured and written to distill.json.
"""

from __future__ import annotations

import copy
import hashlib
import math
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from o2n_edge._lazy import require
from o2n_edge.diffusion.models import (
    LORA_TARGETS,
    build_models,
    decode_latents,
    encode_latents,
    images_to_tensor,
    resize_images,
    save_unet_lora,
)
from o2n_edge.diffusion.personalize import AUG_PER_SHOT, AugmentConfig, _latent_bank, augment
from o2n_edge.diffusion.run_dir import (
    LoadedRun,
    RunDir,
    atomic_dir,
    load_run,
    progress_bar,
    read_json,
    torch_save_atomic,
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

CHECKPOINT_FORMAT = 1
DISTILL_CHECKPOINTS = "distill_checkpoints"  # = RunDir.distill_checkpoints
NUM_DDIM_TIMESTEPS = 50  # the solver grid; matches LCMScheduler.original_inference_steps
SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0
EMA_DECAY = 0.95
BATCH_SIZE = {"tiny": 4, "sd15": 2}
LR_FULL = {"tiny": 1e-4}
LR_LORA = 1e-4
STUDENT_LORA_RANK = 32
GRAD_CLIP = 1.0
# Share of each batch whose timesteps are drawn inside the transform's range (t <= strength);
# the rest spans the whole schedule so pure-noise pool generation works too.
TRANSFORM_FOCUS = 0.5
EVAL_STEPS = (1, 2, 4)
EVAL_AUGMENTED = 4  # augmented views added to the shots for the distance measurement
EVAL_SEED = 1234


@dataclass
class DistillConfig:
    """Settings a distill checkpoint must match to be resumed."""

    run_sha: str
    kind: str
    lcm_lora: str
    lcm_lora_scale: float
    personal_lora_scale: float
    seed: int
    batch_size: int
    student: str  # "full" | "lora"


def _torch() -> Any:
    return require("torch", "distillation")


# --------------------------------------------------------------------------------------------
# LCD building blocks (as in diffusers' consistency-distillation example)
# --------------------------------------------------------------------------------------------


def scalings_for_boundary_conditions(timestep: Any, sigma_data: float = SIGMA_DATA,
                                     timestep_scaling: float = TIMESTEP_SCALING) -> tuple[Any, Any]:
    """c_skip, c_out of the consistency parameterization (= LCMScheduler's)."""
    scaled = timestep * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


class DDIMSolver:
    """One DDIM step on the ``NUM_DDIM_TIMESTEPS`` grid (t_{n+k} -> t_n), the teacher's ODE solver."""

    def __init__(self, alphas_cumprod: np.ndarray, timesteps: int = 1000,
                 ddim_timesteps: int = NUM_DDIM_TIMESTEPS):
        torch = _torch()
        self.step_ratio = timesteps // ddim_timesteps
        self.ddim_timesteps = (np.arange(1, ddim_timesteps + 1) * self.step_ratio).round().astype(np.int64) - 1
        prev = np.asarray([alphas_cumprod[0]] + alphas_cumprod[self.ddim_timesteps[:-1]].tolist())
        self.ddim_timesteps_t = torch.from_numpy(self.ddim_timesteps).long()
        self.ddim_alpha_cumprods_prev = torch.from_numpy(prev).float()

    def ddim_step(self, pred_x0: Any, pred_noise: Any, index: Any) -> Any:
        a_prev = self.ddim_alpha_cumprods_prev.to(pred_x0.device)[index].view(-1, 1, 1, 1)
        return a_prev.sqrt() * pred_x0 + (1.0 - a_prev).sqrt() * pred_noise


def _x0(eps: Any, t: Any, x: Any, ac: Any) -> Any:
    a = ac[t].view(-1, 1, 1, 1)
    return (x - (1 - a).sqrt() * eps) / a.sqrt()


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
        start, losses, train_s = _lcd(
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


def _lcd(run: LoadedRun, teacher: Any, student: Any, vae: Any, cfg: DistillConfig, steps: int,
         ckpt: dict[str, Any] | None, ckpt_dir: Path, checkpoint_every: int, dev: Any,
         progress: bool) -> tuple[int, list[float], float]:
    """The LCD training loop; returns (resumed-from step, losses, training seconds)."""
    torch = _torch()
    diffusers = require("diffusers", "distillation")
    spec = run.spec
    ddpm = diffusers.DDPMScheduler.from_config(run.models.scheduler_config)
    ac_np = ddpm.alphas_cumprod.double().numpy()
    ac = ddpm.alphas_cumprod.float().to(dev)
    solver = DDIMSolver(ac_np, ddpm.config.num_train_timesteps, NUM_DDIM_TIMESTEPS)
    k = ddpm.config.num_train_timesteps // NUM_DDIM_TIMESTEPS
    n_focus = max(1, int(NUM_DDIM_TIMESTEPS * spec.strength))

    if cfg.student == "lora":
        peft = require("peft", "sd15 distillation")
        student.requires_grad_(False)
        with warnings.catch_warnings():
            # A fused-then-unloaded LoRA leaves a peft_config behind; a new adapter is intended.
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            student.add_adapter(peft.LoraConfig(r=STUDENT_LORA_RANK, lora_alpha=STUDENT_LORA_RANK,
                                                init_lora_weights="gaussian", target_modules=LORA_TARGETS))
        params = [p for p in student.parameters() if p.requires_grad]
        target = None  # the LoRA recipe: target = student without grad
        lr = LR_LORA
    else:
        student.requires_grad_(True)
        params = list(student.parameters())
        target = copy.deepcopy(student).requires_grad_(False).eval()
        lr = LR_FULL[cfg.kind]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    start, elapsed = 0, 0.0
    if ckpt is not None:
        start = int(ckpt["step"])
        if cfg.student == "lora":
            peft.set_peft_model_state_dict(student, ckpt["student"])
        else:
            student.load_state_dict(ckpt["student"])
            target.load_state_dict(ckpt["target"])
        opt.load_state_dict(ckpt["opt"])
        losses = list(ckpt["losses"])
        elapsed = float(ckpt.get("train_s", 0.0))

    mean, std = _latent_bank(vae, run.shots, cfg.seed + 31, dev, AugmentConfig(),
                             per_shot=AUG_PER_SHOT[cfg.kind])
    sf = run.models.scaling_factor
    mean, std = mean * sf, std * sf
    prompt = run.prompt_embeds.to(dev)
    bs = cfg.batch_size
    cond = prompt.expand(bs, -1, -1)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    t_start = time.time()
    student.train()
    with progress_bar(steps, f"distill {cfg.kind} (LCD)", progress) as advance:
        advance(start)
        for step in range(start, steps):
            gen = torch.Generator().manual_seed(cfg.seed * 100_019 + step)
            idx = torch.randint(0, len(mean), (bs,), generator=gen)
            lat = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen).to(dev)
            noise = torch.randn(lat.shape, generator=gen).to(dev)
            n_f = int(round(bs * TRANSFORM_FOCUS))
            index = torch.cat([
                torch.randint(0, n_focus, (n_f,), generator=gen),
                torch.randint(0, NUM_DDIM_TIMESTEPS, (bs - n_f,), generator=gen),
            ])
            start_t = solver.ddim_timesteps_t[index].to(dev)
            t_n = torch.clamp(start_t - k, min=0)
            c_skip_s, c_out_s = scalings_for_boundary_conditions(start_t.float())
            c_skip, c_out = scalings_for_boundary_conditions(t_n.float())
            c_skip_s, c_out_s, c_skip, c_out = (c.view(-1, 1, 1, 1) for c in (c_skip_s, c_out_s, c_skip, c_out))
            noisy = ddpm.add_noise(lat, noise, start_t)
            with autocast:
                eps_s = student(noisy, start_t, cond).sample.float()
            model_pred = c_skip_s * noisy + c_out_s * _x0(eps_s, start_t, noisy, ac)
            with torch.no_grad():
                with autocast:
                    eps_t = teacher(noisy, start_t, cond).sample.float()
                x_prev = solver.ddim_step(_x0(eps_t, start_t, noisy, ac), eps_t, index.to(dev))
                tgt_net = target if target is not None else student
                with autocast:
                    eps_n = tgt_net(x_prev, t_n, cond).sample.float()
                target_pred = c_skip * x_prev + c_out * _x0(eps_n, t_n, x_prev, ac)
            loss = torch.nn.functional.mse_loss(model_pred, target_pred)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            opt.step()
            if target is not None:
                with torch.no_grad():
                    for p_t, p_s in zip(target.parameters(), student.parameters()):
                        p_t.mul_(EMA_DECAY).add_(p_s.detach(), alpha=1 - EMA_DECAY)
            losses.append(loss.item())
            advance(1, loss=loss.item())
            done = step + 1
            if done % checkpoint_every == 0 or done == steps:
                peft_sd = (require("peft").get_peft_model_state_dict(student)
                           if cfg.student == "lora" else student.state_dict())
                torch_save_atomic({
                    "format": CHECKPOINT_FORMAT, "config": asdict(cfg), "step": done,
                    "student": peft_sd, "target": target.state_dict() if target is not None else None,
                    "opt": opt.state_dict(), "losses": losses,
                    "train_s": elapsed + time.time() - t_start,
                }, ckpt_dir / f"step_{done:06d}.pt")
                for old in sorted(ckpt_dir.glob("step_*.pt"))[:-2]:
                    old.unlink(missing_ok=True)
    if cfg.student == "full":
        # The EMA target is the consistency model LCD ships (the online student is noisier).
        student.load_state_dict(target.state_dict())
    return start, losses, elapsed + time.time() - t_start


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
