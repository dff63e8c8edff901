"""Build the diffusion networks of a profile: UNet, VAE and the prompt conditioning.

Every profile uses the *same diffusers classes* (``UNet2DConditionModel``, ``AutoencoderKL``, and
for sd15 ``CLIPTextModel``), so personalization, distillation, the LoRA merge and the ONNX export
run one code path whether the networks are tiny random models in CI or a real SD-1.5 checkpoint.

- ``tiny`` / ``lite``: small networks with seeded init, trained from scratch on the shots. They have
  no text encoder: the personalized prompt is a learned embedding ``[1, prompt_len, dim]``
  (textual-inversion-like), trained jointly with the UNet.
- ``sd15``: any SD-1.5-architecture diffusers checkpoint, a local directory or a hub id resolved
  through the Hugging Face cache (:mod:`o2n_edge.hub`).
  :func:`make_tiny_sd15_checkpoint` writes a tiny random checkpoint of the same layout for tests.
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
# Stable Diffusion's training noise schedule; the tiny/lite profiles use the same tables so that
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
LITE_UNET: dict[str, Any] = {
    "block_out_channels": (64, 128, 128),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 1,
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
# 16 channels at full resolution: 2.5x cheaper than 32 per VAE step on a CPU and, trained on
# 32 px crops for ~700 steps, ~24 dB PSNR on unseen 64 px hazelnut test images (measured).
LITE_VAE: dict[str, Any] = {
    "block_out_channels": (16, 32, 64),
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
    (tiny/lite learn the prompt embedding directly). ``prompt_embeds`` is the initial (tiny/lite:
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
    """Build (tiny/lite: seeded init) or load (sd15: local checkpoint) the networks of ``spec``.

    For sd15 ``prompt`` (the identifier prompt) is encoded once so that the run can store the
    conditioning tensor and the runtime needs no text encoder.
    """
    torch = _torch()
    if spec.kind in ("tiny", "lite"):
        if spec.image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4, got {spec.image_size}")
        unet_arch, vae_arch = (TINY_UNET, TINY_VAE) if spec.kind == "tiny" else (LITE_UNET, LITE_VAE)
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
    raise ValueError(f"unknown diffusion kind {spec.kind!r}: choose tiny, lite or sd15")


# --------------------------------------------------------------------------------------------
# Tiny sd15-layout checkpoint and LoRA for tests/CI
# --------------------------------------------------------------------------------------------

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable unicode char."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _write_tiny_tokenizer(path: Path) -> None:
    """A byte-level CLIP BPE vocab (every byte, alone and word-final) + a few merges.

    Every string tokenizes (into characters at worst), so any category name works.
    """
    path.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = ["s k", "sk s</w>", "p h", "o t", "ph ot", "phot o</w>", "o f</w>"]
    for m in merges:
        a, b = m.split()
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (path / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    }))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    }))


def make_tiny_sd15_checkpoint(path: Path | str, seed: int = 0) -> Path:
    """Write a tiny random SD-1.5-layout diffusers checkpoint (same classes, tiny sizes).

    Lets CI run the sd15 code path (text encoder, LoRA, LCM-LoRA merge, export) in seconds.
    Layout: model_index.json, unet/, vae/ (down factor 2), text_encoder/ (hidden 32),
    tokenizer/ (vocab.json + merges.txt), scheduler/ (SD's PNDM config).
    """
    torch = _torch()
    diffusers = require("diffusers", "the tiny sd15 checkpoint")
    transformers = require("transformers", "the tiny sd15 checkpoint")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=32,
        norm_num_groups=32,
        scaling_factor=0.18215,
    )
    _write_tiny_tokenizer(path / "tokenizer")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(path / "tokenizer")
    te_cfg = transformers.CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        projection_dim=32,
    )
    text_encoder = transformers.CLIPTextModel(te_cfg)
    scheduler = diffusers.PNDMScheduler(skip_prk_steps=True, **{
        k: v for k, v in SD_SCHEDULER_CONFIG.items()
        if k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                 "set_alpha_to_one", "steps_offset", "prediction_type", "timestep_spacing")
    })
    unet.save_pretrained(path / "unet")
    vae.save_pretrained(path / "vae")
    text_encoder.save_pretrained(path / "text_encoder")
    scheduler.save_pretrained(path / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


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


def make_tiny_lora(checkpoint: Path | str, out_dir: Path | str, rank: int = 4, seed: int = 1,
                   scale: float = 0.02) -> Path:
    """Write a random diffusers-format LoRA for the UNet of ``checkpoint`` (e.g. a fake LCM-LoRA).

    A real LCM-LoRA is "just another LoRA" on the same attention layers; tests merge this one to
    exercise the two-adapter load/weight/fuse path without downloading anything.
    """
    torch = _torch()
    diffusers = require("diffusers", "LoRA")
    peft = require("peft", "LoRA")
    unet = diffusers.UNet2DConditionModel.from_pretrained(Path(checkpoint) / "unet")
    unet.add_adapter(peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS,
                                     init_lora_weights="gaussian"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return save_unet_lora(unet, out_dir)


# Layers the published LCM-LoRA for SD-1.5 (latent-consistency/lcm-lora-sdv1-5) adapts, by the
# suffix of their diffusers module name; its file uses kohya-style keys
# ``lora_unet_<module path with _>.{lora_down.weight,lora_up.weight,alpha}``.
LCM_LORA_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                     "conv1", "conv2", "time_emb_proj")


def write_kohya_lora(unet: Any, path: Path | str, rank: int = 64, seed: int = 2, scale: float = 0.01,
                     suffixes: tuple[str, ...] = LCM_LORA_SUFFIXES) -> Path:
    """Write a seeded random LoRA for ``unet`` in the published LCM-LoRA key format (kohya-style).

    Why: the dry run and the tests must load a file laid out like the one users download, so that
    diffusers' key conversion (not only our own peft format) is exercised. Conv layers get
    ``[r, in, k, k]`` down / ``[out, r, 1, 1]`` up weights, as in that file.
    """
    torch = _torch()
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, Any] = {}
    for name, mod in unet.named_modules():
        if not name.endswith(suffixes) or not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        if isinstance(mod, torch.nn.Linear):
            down = torch.randn(rank, mod.in_features, generator=gen) / mod.in_features ** 0.5
            up = torch.randn(mod.out_features, rank, generator=gen) * scale
        else:
            k = mod.kernel_size
            down = torch.randn(rank, mod.in_channels, *k, generator=gen) / (mod.in_channels * k[0] * k[1]) ** 0.5
            up = torch.randn(mod.out_channels, rank, 1, 1, generator=gen) * scale
        tensors[f"{key}.lora_down.weight"] = down.contiguous()
        tensors[f"{key}.lora_up.weight"] = up.contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


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
