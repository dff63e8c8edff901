"""Tiny SD-1.5-layout checkpoints and LoRA files for tests and dry runs (not product code).

They let CI run the sd15 code path (text encoder, LoRA, LCM-LoRA merge, export) in seconds and
load files laid out like the ones users download, without any download. Importable as
``sd15_fixtures`` from tests and as ``tests.sd15_fixtures`` from the repository root.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from o2n_edge._lazy import require
from o2n_edge.diffusion.models import LORA_TARGETS, SD_SCHEDULER_CONFIG, save_unet_lora


def _torch() -> Any:
    return require("torch", "the sd15 test fixtures")


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
