"""The lite profile's diffusion: a small local denoiser in the pretrained TAEF2 latent space.

Why this shape (issue 10): a UNet trained on the latents of 1-4 shots memorizes them and returns
darker, lower-contrast copies of the shots for any new image. What a few shots *can* teach is the
local look of a good surface, the way single-image diffusion models learn from one picture:

- the latent space is pretrained (TAEF2, shipped), so nothing about pixels is learned from the shots;
- the denoiser is fully convolutional, attention-free, normalizes per pixel (no GroupNorm, whose
  image-wide statistics would differ between a crop and a whole image) and has a bounded receptive field
  (``blocks + 2`` 3x3 convolutions: 11 latent pixels = 88 image pixels at 128 px by default), and
  it is trained on random latent *crops*, so it cannot learn where things are, only what they
  look like;
- it is trained only where the transform works, ``t <= strength``: the one-to-normal transform
  starts at ``strength`` and takes one step, so time spent learning pure noise is wasted;
- the shots are augmented the way parts vary on a line (shift, small rotation, brightness,
  flips), never by anything that could look like a defect;
- the transform can keep the query's low latent frequencies (``DiffusionSpec.keep_low_sigma``):
  brightness and contrast come from the query, the denoiser only changes the local detail.

The network takes the same ``(sample, timestep, encoder_hidden_states)`` call as diffusers'
``UNet2DConditionModel``, so distillation, the transform, the pool and the ONNX export drive it
through one code path. The learned prompt embedding conditions it through the time embedding.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import numpy as np

from o2n_edge._lazy import require
from o2n_edge.diffusion.augment import augment
from o2n_edge.diffusion.models import LEARNED_PROMPT_LEN, SD_SCHEDULER_CONFIG, DiffusionModels, images_to_tensor
from o2n_edge.diffusion.run_dir import atomic_dir, progress_bar
from o2n_edge.profiles import DiffusionSpec

torch = require("torch", "the lite diffusion")
diffusers = require("diffusers", "the lite diffusion")
nn = torch.nn
F = nn.functional

WIDTH = 96
BLOCKS = 3  # receptive field = 2 * (BLOCKS + 2) + 1 latent pixels
PROMPT_DIM = 32
TIME_DIM = 128
CROP = 8  # latent pixels per training crop (64 image pixels)
BATCH = 32
LR = 1e-3
PROMPT_LR = 1e-3
WARMUP = 20
GRAD_CLIP = 1.0
AUG_PER_SHOT = 24  # augmented views per shot in the latent bank
MAX_BANK = 256
ENCODE_BATCH = 16


class PixelNorm(nn.Module):
    """RMS norm over channels at each pixel, with a learned gain.

    Not GroupNorm: its statistics span the whole image, so a training crop and a full test image
    would be normalized differently, and every output would depend on every input pixel.
    """

    def __init__(self, width: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: Any) -> Any:
        return x * torch.rsqrt((x * x).mean(dim=1, keepdim=True) + self.eps) * self.gain[None, :, None, None]


class _ResBlock(nn.Module):
    def __init__(self, width: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1 = PixelNorm(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * width)
        self.norm2 = PixelNorm(width)
        self.conv2 = nn.Conv2d(width, width, 1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Any, emb: Any) -> Any:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return x + self.conv2(F.silu(h))


class LocalDenoiser(diffusers.ModelMixin, diffusers.ConfigMixin):
    """Attention-free, fully convolutional epsilon predictor with a bounded receptive field."""

    @diffusers.configuration_utils.register_to_config
    def __init__(self, in_channels: int = 32, width: int = WIDTH, num_blocks: int = BLOCKS,
                 cross_attention_dim: int = PROMPT_DIM, time_dim: int = TIME_DIM) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, width, 3, padding=1)
        self.cond = nn.Linear(cross_attention_dim, time_dim)
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.res_blocks = nn.ModuleList([_ResBlock(width, time_dim) for _ in range(num_blocks)])
        self.norm_out = PixelNorm(width)
        self.conv_out = nn.Conv2d(width, in_channels, 3, padding=1)

    @property
    def receptive_field(self) -> int:
        """Latent pixels one output sees (every 3x3 conv adds one on each side)."""
        return 2 * (len(self.res_blocks) + 2) + 1

    def forward(self, sample: Any, timestep: Any, encoder_hidden_states: Any, timestep_cond: Any = None,
                return_dict: bool = True) -> Any:
        b = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).float()
        t = t.expand(b) if t.shape[0] == 1 else t
        emb = diffusers.models.embeddings.get_timestep_embedding(
            t, self.config.time_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        emb = self.time_mlp(emb + self.cond(encoder_hidden_states.mean(dim=1)))
        h = self.conv_in(sample)
        for blk in self.res_blocks:
            h = blk(h, emb)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return SimpleNamespace(sample=out) if return_dict else (out,)


def build_lite_models(spec: DiffusionSpec) -> DiffusionModels:
    """TAEF2 (pretrained, shipped) + a seeded LocalDenoiser + a seeded prompt embedding."""
    from o2n_edge.diffusion.taef2 import DOWNSAMPLE, LATENT_CHANNELS, SCALING_FACTOR, load_taef2

    if spec.image_size % (DOWNSAMPLE * 2):
        raise ValueError(f"lite image_size must be a multiple of {DOWNSAMPLE * 2}, got {spec.image_size}")
    torch.manual_seed(spec.seed)
    unet = LocalDenoiser(in_channels=LATENT_CHANNELS)
    gen = torch.Generator().manual_seed(spec.seed + 1)
    embeds = torch.randn(1, LEARNED_PROMPT_LEN, PROMPT_DIM, generator=gen)
    return DiffusionModels(
        unet=unet, vae=load_taef2(), prompt_dim=PROMPT_DIM, prompt_len=LEARNED_PROMPT_LEN,
        latent_channels=LATENT_CHANNELS, vae_scale=DOWNSAMPLE, scaling_factor=SCALING_FACTOR,
        scheduler_config=dict(SD_SCHEDULER_CONFIG), kind="lite", prompt_embeds=embeds,
    )


def max_timestep(spec: DiffusionSpec, num_train_timesteps: int = 1000) -> int:
    """Highest training timestep: the transform's start (``strength``), never pure noise."""
    return max(1, min(num_train_timesteps - 1, int(round(spec.strength * num_train_timesteps))))


def latent_bank(vae: Any, shots: np.ndarray, seed: int, scaling_factor: float, aug: Any,
                per_shot: int = AUG_PER_SHOT) -> Any:
    """Scaled TAEF2 latents of the shots and of ``per_shot`` augmented views of each."""
    n_aug = max(0, min(MAX_BANK, per_shot * len(shots)) - len(shots))
    pixels = images_to_tensor(shots)
    if n_aug:
        pixels = torch.cat([pixels, augment(shots, n_aug, seed=seed * 7919 + 17, cfg=aug)])
    out = []
    with torch.no_grad():
        for i in range(0, len(pixels), ENCODE_BATCH):
            out.append(vae.encode(pixels[i:i + ENCODE_BATCH]).latent_dist.mean.float() * scaling_factor)
    return torch.cat(out)


def random_crops(x: Any, size: int, gen: Any) -> Any:
    """An independent ``size`` x ``size`` window of each row of ``x`` (B,C,H,W)."""
    h, w = x.shape[-2:]
    if size >= min(h, w):
        return x
    i = torch.randint(0, h - size + 1, (len(x),), generator=gen).tolist()
    j = torch.randint(0, w - size + 1, (len(x),), generator=gen).tolist()
    return torch.stack([x[b, :, i[b]:i[b] + size, j[b]:j[b] + size] for b in range(len(x))])


def train_lite(trainer: Any, steps: int, ckpt: dict[str, Any] | None, checkpoint_every: int,
               **_: Any) -> dict[str, Any]:
    """The lite personalization loop (called by ``personalize`` with its ``_Trainer`` plumbing).

    Epsilon MSE on random latent crops of the shots' augmented views, timesteps drawn uniformly
    in ``[0, max_timestep]``; the prompt embedding trains with the denoiser.
    """
    m = trainer.models
    unet = m.unet.to(trainer.device)
    prompt = nn.Parameter(m.prompt_embeds.clone().to(trainer.device))
    opt = torch.optim.AdamW([{"params": list(unet.parameters()), "lr": LR},
                             {"params": [prompt], "lr": PROMPT_LR, "weight_decay": 0.0}], weight_decay=1e-2)
    start, elapsed = 0, 0.0
    trainer.losses = {"unet": []}
    if ckpt is not None:
        start = int(ckpt["step"])
        unet.load_state_dict(ckpt["unet"])
        with torch.no_grad():
            prompt.copy_(ckpt["prompt"].to(trainer.device))
        opt.load_state_dict(ckpt["opt"])
        trainer.losses = {k: list(v) for k, v in ckpt["losses"].items()}
        elapsed = float(ckpt.get("train_s", 0.0))
        steps = max(steps, start)
    t_start = time.time()
    bank = latent_bank(m.vae, trainer.shots, trainer.cfg.seed, m.scaling_factor, trainer.aug).to(trainer.device)
    t_hi = max_timestep(trainer.spec, trainer.ddpm.config.num_train_timesteps)
    unet.train()
    with progress_bar(steps, "personalize lite (local denoiser)", trainer.progress) as advance:
        advance(start)
        for step in range(start, steps):
            for g, base in zip(opt.param_groups, (LR, PROMPT_LR)):
                g["lr"] = base * min(1.0, (step + 1) / WARMUP)
            gen = torch.Generator().manual_seed(trainer.cfg.seed * 100_003 + step)
            idx = torch.randint(0, len(bank), (BATCH,), generator=gen)
            lat = random_crops(bank[idx], CROP, gen)
            noise = torch.randn(lat.shape, generator=gen).to(trainer.device)
            t = torch.randint(0, t_hi + 1, (BATCH,), generator=gen).to(trainer.device)
            noisy = trainer.ddpm.add_noise(lat, noise, t)
            pred = unet(noisy, t, prompt.expand(BATCH, -1, -1)).sample
            loss = F.mse_loss(pred.float(), noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + [prompt], GRAD_CLIP)
            opt.step()
            trainer.losses["unet"].append(loss.item())
            advance(1, loss=loss.item())
            done = step + 1
            if done % checkpoint_every == 0 or done == steps:
                trainer._checkpoint(done, {"unet": unet.state_dict(), "prompt": prompt.detach().cpu(),
                                           "opt": opt.state_dict(), "train_s": elapsed + time.time() - t_start})
    unet.eval().requires_grad_(False)
    m.prompt_embeds = prompt.detach().cpu()
    with atomic_dir(trainer.rd.unet) as tmp:
        unet.to("cpu").save_pretrained(tmp)
    return {"prompt_embeds": m.prompt_embeds, "steps": steps, "vae_steps": 0,
            "resumed_from": int(ckpt["step"]) if ckpt else 0, "losses": trainer.losses,
            "train_s": elapsed + time.time() - t_start, "max_timestep": t_hi,
            "receptive_field": unet.receptive_field, "crop": CROP}


def keep_low_frequencies(denoised: Any, source: Any, sigma: float) -> Any:
    """``denoised - G(denoised) + G(source)``: the query's low latent frequencies, the model's detail.

    G is a separable gaussian with reflect padding applied as two matrices (the runtime applies
    the very same matrices in numpy: ``o2n_edge.runtime.latent_ops.lowpass_matrix``).
    """
    if sigma <= 0:
        return denoised
    from o2n_edge.runtime.latent_ops import lowpass_matrix

    h, w = denoised.shape[-2:]
    gy = torch.from_numpy(lowpass_matrix(h, sigma)).to(denoised)
    gx = gy if w == h else torch.from_numpy(lowpass_matrix(w, sigma)).to(denoised)

    def low(x: Any) -> Any:
        return torch.einsum("ih,bchw,jw->bcij", gy, x, gx)

    return denoised - low(denoised) + low(source.to(denoised))
