"""Anomaly personalization: DreamBooth-style training of the diffusion model on the k good shots.

The personalized model is what turns a query into its "normal version" (One-to-Normal): it must
know this category's normal look from only a few images, so training uses the identifier prompt
("a photo of sks <category>") and heavy-but-plausible augmentation (flips, ±10° rotations, small
crops/rescales, mild colour jitter).

- ``tiny`` has no pretrained weights: a short VAE phase (reconstruction + small KL)
  learns a latent space for this category, then the UNet and the learned prompt embedding train
  on the frozen VAE's latents with the epsilon-prediction MSE under DDPM noise.
- ``sd15`` trains a LoRA on the UNet attention layers (peft) with the frozen SD VAE/text encoder,
  optionally with prior preservation, and saves it in diffusers LoRA format so other SD tools load
  it too.

Training is checkpointed atomically every N steps and resumes from the newest checkpoint when the
run configuration matches; all per-step randomness is derived from (seed, step), so a resumed run
continues the same sequence. This module owns the run (configuration, resume, files); the training
loops are in :mod:`o2n_edge.diffusion.personalize_trainers`.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from o2n_edge._lazy import require
from o2n_edge.diffusion.augment import AugmentConfig, augment  # noqa: F401 (augment re-exported)
from o2n_edge.diffusion.models import build_models, resize_images
from o2n_edge.diffusion.personalize_trainers import (  # noqa: F401 (AUG_PER_SHOT re-exported)
    AUG_PER_SHOT,
    CHECKPOINT_FORMAT,
    PRIOR_CLASS_IMAGES,
    RunConfig,
    ScratchTrainer,
    SD15Trainer,
    ddpm_scheduler,
)
from o2n_edge.diffusion.run_dir import (
    RunDir,
    atomic_dir,
    save_npy_atomic,
    spec_to_dict,
    versions,
    write_json_atomic,
)
from o2n_edge.profiles import DiffusionSpec

PROMPT_TEMPLATE = "a photo of sks {category}"
# Optimizer batch size per kind (sd15 is a GPU profile at 512 px).
BATCH_SIZE = {"tiny": 4, "sd15": 2}


def _torch() -> Any:
    return require("torch", "personalization")


def _shots_hash(shots: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(shots).tobytes()).hexdigest()


def _device(device: str | None) -> Any:
    torch = _torch()
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    tail = values[-max(1, len(values) // 10):]
    return {
        "first": float(values[0]),
        "last": float(np.mean(tail)),
        "min": float(np.min(values)),
        "n": len(values),
    }


def personalize(
    shots: list[np.ndarray] | np.ndarray,
    category: str,
    spec: DiffusionSpec,
    out_dir: Path,
    steps: int | None = None,
    seed: int = 0,
    resume: bool = True,
    progress: bool = True,
    lora_rank: int = 8,
    prior_preservation: bool = False,
    checkpoint_every: int | None = None,
    num_class_images: int = PRIOR_CLASS_IMAGES,
    augment_config: AugmentConfig = AugmentConfig(),
    device: str | None = None,
) -> Path:
    """Personalize the profile's diffusion model on ``shots``; returns the run dir ``out_dir``.

    ``steps`` is the total optimizer budget (tiny: VAE phase + UNet phase; default
    ``spec.personalize_steps``). With ``resume`` and a matching checkpoint in
    ``out_dir/checkpoints`` training continues from it (a larger ``steps`` extends a finished run).
    """
    torch = _torch()
    t0, c0 = time.time(), time.process_time()
    out_dir = Path(out_dir)
    rd = RunDir(out_dir)
    if spec.kind not in BATCH_SIZE:
        raise ValueError(f"cannot personalize diffusion kind {spec.kind!r}: choose {' or '.join(BATCH_SIZE)}")
    steps = int(spec.personalize_steps if steps is None else steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not category or not category.strip():
        raise ValueError("category must be a non-empty name (it goes into the prompt)")
    shots_arr = resize_images(shots, spec.image_size)
    prompt = PROMPT_TEMPLATE.format(category=category.strip())
    spec = replace(spec, seed=seed)
    dev = _device(device)
    base_model = ""
    if spec.kind == "sd15":
        from o2n_edge.diffusion.models import resolve_base_model

        base_model = str(resolve_base_model(spec).resolve())
        spec = replace(spec, base_model=base_model)
    cfg = RunConfig(
        kind=spec.kind, category=category.strip(), image_size=spec.image_size, prompt=prompt,
        seed=seed, shots_sha256=_shots_hash(shots_arr), n_shots=len(shots_arr),
        lora_rank=lora_rank if spec.kind == "sd15" else 0,
        prior_preservation=bool(prior_preservation and spec.kind == "sd15"),
        base_model=base_model, batch_size=BATCH_SIZE[spec.kind],
    )
    checkpoint_every = checkpoint_every or max(10, steps // 5)

    ckpt: dict[str, Any] | None = None
    latest = rd.latest_checkpoint()
    if latest is not None:
        loaded = torch.load(latest, map_location="cpu", weights_only=False)
        if resume and loaded.get("format") == CHECKPOINT_FORMAT and loaded.get("config") == asdict(cfg):
            ckpt = loaded
        else:
            # A different run (or resume=False): its checkpoints must not mix with this one's.
            if progress:
                from rich.console import Console

                why = "resume=False" if not resume else "the run configuration changed"
                Console(stderr=True).print(f"[yellow]not resuming from {latest.name}: {why}; starting fresh")
            shutil.rmtree(rd.checkpoints, ignore_errors=True)

    # The teacher is about to change: the old run.json (completion marker) and any student
    # distilled from the old teacher must not survive next to the new weights.
    rd.run_json.unlink(missing_ok=True)
    rd.distill_json.unlink(missing_ok=True)
    shutil.rmtree(rd.student, ignore_errors=True)
    shutil.rmtree(rd.distill_checkpoints, ignore_errors=True)

    torch.manual_seed(seed)
    models = build_models(replace(spec, seed=seed), prompt=prompt if spec.kind == "sd15" else None)
    trainer = SD15Trainer if spec.kind == "sd15" else ScratchTrainer
    result = trainer(models, shots_arr, cfg, spec, rd, dev, augment_config, progress).run(
        steps=steps, ckpt=ckpt, checkpoint_every=checkpoint_every,
        num_class_images=num_class_images,
    )

    # Final artifacts; run.json last: its presence marks a complete run.
    save_npy_atomic(rd.shots, shots_arr)
    save_npy_atomic(rd.prompt_embeds, result["prompt_embeds"].detach().float().cpu().numpy())
    with atomic_dir(rd.scheduler) as tmp:
        ddpm_scheduler(models).save_pretrained(tmp)
    wall = time.time() - t0
    info = {
        "kind": spec.kind,
        "category": cfg.category,
        "image_size": spec.image_size,
        "prompt": prompt,
        "seed": seed,
        "steps": result["steps"],
        "vae_steps": result.get("vae_steps", 0),
        "resumed_from": result["resumed_from"],
        "shots": len(shots_arr),
        "shots_sha256": cfg.shots_sha256,
        "batch_size": cfg.batch_size,
        "lora_rank": cfg.lora_rank,
        "prior_preservation": cfg.prior_preservation,
        "augment": asdict(augment_config),
        "losses": {k: _summary(v) for k, v in result["losses"].items()},
        "scaling_factor": float(models.vae.config.scaling_factor),
        "wall_s": round(wall, 2),
        "cpu_s": round(time.process_time() - c0, 2),  # process CPU time (contention-proof)
        "threads": torch.get_num_threads(),
        "train_s": round(result["train_s"], 2),
        "device": str(dev),
        "versions": versions(),
        "spec": spec_to_dict(spec),
    }
    if spec.kind == "sd15":
        info["base_model"] = base_model
        info["lora"] = str(rd.lora.name)
    write_json_atomic(rd.run_json, info)
    return out_dir
