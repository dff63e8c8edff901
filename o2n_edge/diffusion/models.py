"""Build the diffusion networks of a profile: UNet, VAE and the prompt conditioning.

Every profile uses the *same diffusers classes* (``UNet2DConditionModel``, ``AutoencoderKL``, and
for sd15 ``CLIPTextModel``), so personalization, distillation, the LoRA merge and the ONNX export
run one code path whether the networks are tiny random models in CI or a real SD-1.5 checkpoint.

- ``tiny``: small networks with seeded init, trained from scratch on the shots. It has no text
  encoder: the personalized prompt is a learned embedding ``[1, prompt_len, dim]``
  (textual-inversion-like), trained jointly with the UNet.
- ``sd15``: any SD-1.5-architecture diffusers checkpoint, a local directory or a hub id resolved
  through the Hugging Face cache (:mod:`o2n_edge.hub`); ``tests/sd15_fixtures.py`` writes a tiny
  random checkpoint of the same layout for tests.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from o2n_edge._lazy import require
from o2n_edge.profiles import DiffusionSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

# Env var that points to a local SD-1.5 diffusers checkpoint when --base-model is not given.
SD15_ENV = "O2N_SD15"
# Learned prompt length of the text-encoder-free profiles (tokens of the personalized prompt).
LEARNED_PROMPT_LEN = 4
# Stable Diffusion's training noise schedule; the tiny profile uses the same tables so that
# the runtime's scheduler port is exercised with the production numbers.
SD_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
# Architectures of the from-scratch profiles. The VAE downsamples by 2**(len(blocks)-1) = 4.
TINY_UNET: dict[str, Any] = {
    "block_out_channels": (32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
TINY_VAE: dict[str, Any] = {
    "block_out_channels": (16, 32, 32),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 16,
}
# sd15 checkpoint sub-folders (diffusers layout).
SD15_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class DiffusionModels:
    """The networks of one profile plus the numbers every stage needs to drive them.

    ``unet``/``vae`` are diffusers modules; ``text_encoder``/``tokenizer`` exist only for sd15
    (tiny learns the prompt embedding directly). ``prompt_embeds`` is the initial (tiny:
    seeded random, to be learned; sd15: encoded identifier prompt) conditioning tensor.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    prompt_dim: int  # cross-attention dim of the UNet
    prompt_len: int  # tokens of the conditioning sequence (77 for CLIP, 4 learned otherwise)
    latent_channels: int
    vae_scale: int  # spatial down factor pixels -> latents
    scaling_factor: float  # latents = vae mean * scaling_factor
    scheduler_config: dict[str, Any]  # the training noise schedule (DDPM/LCM/DDIM are built from it)
    kind: str = "tiny"
    text_encoder: Any | None = None
    tokenizer: Any | None = None
    prompt_embeds: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _torch() -> Any:
    return require("torch", "diffusion models")


def _seeded_unet(arch: dict[str, Any], sample_size: int) -> UNet2DConditionModel:
    diffusers = require("diffusers", "diffusion models")
    return diffusers.UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, **arch
    )


def _seeded_vae(arch: dict[str, Any], sample_size: int) -> AutoencoderKL:
    diffusers = require("diffusers", "diffusion models")
    n = len(arch["block_out_channels"])
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        sample_size=sample_size,
        scaling_factor=1.0,  # re-estimated from the shots' latents after VAE training
        **arch,
    )


def resolve_base_model(spec: DiffusionSpec) -> Path:
    """The sd15 checkpoint dir: ``spec.base_model`` or ``$O2N_SD15``, a local dir or a hub id.

    A hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``) is resolved to its snapshot in the
    Hugging Face cache (``HF_HOME``/``HF_HUB_OFFLINE`` honoured; see :mod:`o2n_edge.hub`).
    """
    from o2n_edge.hub import resolve_sd15

    raw = spec.base_model or os.environ.get(SD15_ENV, "")
    if not raw:
        raise FileNotFoundError(
            "profile sd15 needs an SD-1.5 diffusers checkpoint: pass --base-model DIR or a hub id "
            f"(e.g. stable-diffusion-v1-5/stable-diffusion-v1-5), or set {SD15_ENV}"
        )
    path = resolve_sd15(raw)
    missing = [p for p in ("unet", "vae", "text_encoder", "tokenizer") if not (path / p).is_dir()]
    if not path.is_dir() or missing:
        what = "does not exist" if not path.is_dir() else f"lacks {', '.join(missing)}/"
        raise FileNotFoundError(
            f"sd15 base model {str(path)!r} {what}: pass --base-model DIR (or set {SD15_ENV}) "
            "to a diffusers-layout SD-1.5 checkpoint with unet/, vae/, text_encoder/, tokenizer/, or a hub id"
        )
    return path


def encode_prompt(text_encoder: Any, tokenizer: Any, prompt: str) -> torch.Tensor:
    """CLIP hidden states of ``prompt`` padded to the tokenizer's max length: ``[1, 77, dim]``."""
    torch = _torch()
    ids = tokenizer(
        prompt,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        hidden = text_encoder(ids.to(text_encoder.device))[0]
    return hidden.float()


def _scheduler_config_from(path: Path) -> dict[str, Any]:
    cfg_file = path / "scheduler" / "scheduler_config.json"
    cfg = dict(SD_SCHEDULER_CONFIG)
    if cfg_file.is_file():
        loaded = json.loads(cfg_file.read_text())
        for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                    "prediction_type", "steps_offset", "set_alpha_to_one", "trained_betas"):
            if key in loaded and loaded[key] is not None:
                cfg[key] = loaded[key]
    return cfg


def build_models(spec: DiffusionSpec, prompt: str | None = None) -> DiffusionModels:
    """Build (tiny: seeded init) or load (sd15: local checkpoint) the networks of ``spec``.

    For sd15 ``prompt`` (the identifier prompt) is encoded once so that the run can store the
    conditioning tensor and the runtime needs no text encoder.
    """
    torch = _torch()
    if spec.kind == "tiny":
        if spec.image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4, got {spec.image_size}")
        unet_arch, vae_arch = TINY_UNET, TINY_VAE
        torch.manual_seed(spec.seed)
        vae = _seeded_vae(vae_arch, spec.image_size)
        vae_scale = 2 ** (len(vae_arch["block_out_channels"]) - 1)
        unet = _seeded_unet(unet_arch, spec.image_size // vae_scale)
        dim = int(unet_arch["cross_attention_dim"])
        gen = torch.Generator().manual_seed(spec.seed + 1)
        embeds = torch.randn(1, LEARNED_PROMPT_LEN, dim, generator=gen)
        return DiffusionModels(
            unet=unet,
            vae=vae,
            prompt_dim=dim,
            prompt_len=LEARNED_PROMPT_LEN,
            latent_channels=int(vae_arch["latent_channels"]),
            vae_scale=vae_scale,
            scaling_factor=float(vae.config.scaling_factor),
            scheduler_config=dict(SD_SCHEDULER_CONFIG),
            kind=spec.kind,
            prompt_embeds=embeds,
        )
    if spec.kind == "sd15":
        path = resolve_base_model(spec)
        diffusers = require("diffusers", "the sd15 profile")
        transformers = require("transformers", "the sd15 text encoder")
        unet = diffusers.UNet2DConditionModel.from_pretrained(path / "unet")
        vae = diffusers.AutoencoderKL.from_pretrained(path / "vae")
        text_encoder = transformers.CLIPTextModel.from_pretrained(path / "text_encoder")
        tokenizer = transformers.CLIPTokenizer.from_pretrained(path / "tokenizer")
        text_encoder.requires_grad_(False).eval()
        vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        if spec.image_size % (vae_scale * 2 ** (len(unet.config.block_out_channels) - 1)):
            raise ValueError(f"image_size {spec.image_size} does not fit this checkpoint's down factors")
        embeds = encode_prompt(text_encoder, tokenizer, prompt) if prompt else None
        return DiffusionModels(
            unet=unet,
            vae=vae,
            prompt_dim=int(unet.config.cross_attention_dim),
            prompt_len=int(tokenizer.model_max_length),
            latent_channels=int(vae.config.latent_channels),
            vae_scale=vae_scale,
            scaling_factor=float(vae.config.scaling_factor),
            scheduler_config=_scheduler_config_from(path),
            kind="sd15",
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            prompt_embeds=embeds,
            extra={"base_model": str(path)},
        )
    raise ValueError(f"unknown diffusion kind {spec.kind!r}: choose tiny or sd15")


# --------------------------------------------------------------------------------------------
# LoRA (personalization and distillation of sd15)
# --------------------------------------------------------------------------------------------

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def save_unet_lora(unet: Any, out_dir: Path | str) -> Path:
    """Save the UNet's active peft LoRA in diffusers format (``pytorch_lora_weights.safetensors``).

    This is the format ``StableDiffusionPipeline.load_lora_weights`` and other SD tools read.
    """
    diffusers = require("diffusers", "saving LoRA weights")
    peft = require("peft", "saving LoRA weights")
    from diffusers.utils import convert_state_dict_to_diffusers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = convert_state_dict_to_diffusers(peft.get_peft_model_state_dict(unet))
    diffusers.StableDiffusionPipeline.save_lora_weights(
        save_directory=str(out_dir), unet_lora_layers=layers, safe_serialization=True
    )
    return out_dir / "pytorch_lora_weights.safetensors"


# --------------------------------------------------------------------------------------------
# Pixels <-> latents (shared by personalize, distill, transform, pool)
# --------------------------------------------------------------------------------------------


def resize_images(images: Any, size: int) -> Any:
    """Validate uint8 (H,W,3) images and resize them (bicubic) to ``size`` x ``size``.

    Accepts a list of arrays or a (B,H,W,3) array; returns a uint8 (B,size,size,3) array.
    """
    import numpy as np
    from PIL import Image

    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = images[None]
    out = []
    for i, img in enumerate(images):
        arr = np.asarray(img)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(
                f"image {i}: expected a uint8 (H, W, 3) RGB array, got {arr.dtype} {arr.shape}"
            )
        if arr.shape[:2] != (size, size):
            arr = np.asarray(Image.fromarray(arr).resize((size, size), Image.BICUBIC))
        out.append(arr)
    if not out:
        raise ValueError("no images given")
    return np.stack(out)


def images_to_tensor(images: Any) -> torch.Tensor:
    """uint8 (B,H,W,3) -> float32 (B,3,H,W) in [-1, 1] (the VAE's input range)."""
    torch = _torch()
    import numpy as np

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def tensor_to_images(x: torch.Tensor) -> Any:
    """float (B,3,H,W) in [-1, 1] -> uint8 (B,H,W,3), rounded and clipped."""
    x = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round()
    return x.permute(0, 2, 3, 1).to(dtype=_torch().uint8).cpu().numpy()


def encode_latents(vae: Any, pixels: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """Deterministic latents: the posterior MEAN times ``scaling_factor`` (what the export runs)."""
    torch = _torch()
    with torch.no_grad():
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return dist.mean.float() * scaling_factor


def decode_latents(vae: Any, latents: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """Pixels in [-1, 1] from scaled latents."""
    torch = _torch()
    with torch.no_grad():
        out = vae.decode((latents / scaling_factor).to(vae.device, vae.dtype)).sample
    return out.float()
