"""Latent consistency distillation (LCD): the training loop that makes a few-step student.

Why its own module: :mod:`o2n_edge.diffusion.distill` decides what a student is (an LCM-LoRA
merge or LCD, resumed or fresh) and measures it; this module is the LCD recipe itself, written
after diffusers' ``examples/consistency_distillation/train_lcm_distill_sd_wds.py``: a noisy latent
at ``t_{n+k}`` goes one DDIM-solver step with the teacher to ``t_n``, and the student's consistency
function at ``t_{n+k}`` is pulled towards the target's at ``t_n`` (boundary conditions c_skip/c_out,
sigma_data 0.5, timestep scaling 10: the numbers LCMScheduler uses).
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from o2n_edge._lazy import require
from o2n_edge.diffusion.augment import AugmentConfig
from o2n_edge.diffusion.models import LORA_TARGETS
from o2n_edge.diffusion.personalize_trainers import AUG_PER_SHOT, latent_bank
from o2n_edge.diffusion.run_dir import LoadedRun, progress_bar, torch_save_atomic

CHECKPOINT_FORMAT = 1
NUM_DDIM_TIMESTEPS = 50  # the solver grid; matches LCMScheduler.original_inference_steps
SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0
EMA_DECAY = 0.95
LR_FULL = {"tiny": 1e-4}
LR_LORA = 1e-4
STUDENT_LORA_RANK = 32
GRAD_CLIP = 1.0
# Share of each batch whose timesteps are drawn inside the transform's range (t <= strength);
# the rest spans the whole schedule so pure-noise pool generation works too.
TRANSFORM_FOCUS = 0.5


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


def train_lcd(run: LoadedRun, teacher: Any, student: Any, vae: Any, cfg: DistillConfig, steps: int,
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

    mean, std = latent_bank(vae, run.shots, cfg.seed + 31, dev, AugmentConfig(),
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
