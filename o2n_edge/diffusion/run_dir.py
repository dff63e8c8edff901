"""The personalization run directory: its layout, atomic writes, and loading it back.

A run dir is the unit every later stage reads (distil, transform, pool, export). It is written
so that an interrupted command never leaves a half-written artifact: every file and model folder
is written to a temporary name and renamed into place.

Layout::

    run_dir/
      run.json             what was trained: profile kind, category, prompt, seed, steps, shots,
                           losses, wall time, versions, the DiffusionSpec
      shots.npy            uint8 (k, S, S, 3) the shots at the diffusion image size
      prompt_embeds.npy    float32 [1, L, D] personalized prompt conditioning (no text encoder
                           needed at run time)
      scheduler/           the training noise schedule (DDPMScheduler config)
      unet/ vae/           tiny: the trained networks (diffusers save_pretrained)
      lora/                sd15: personalization LoRA, diffusers format
                           (pytorch_lora_weights.safetensors)
      class_latents.pt     sd15 with prior preservation: cached class-prior latents
      checkpoints/         step_NNNNNN.pt resumable training state (the 2 latest)
      student/unet/        distilled few-step student (full UNet, LoRA fused)
      student/lora/        sd15 consistency-distillation LoRA (if trained), diffusers format
      distill_checkpoints/ step_NNNNNN.pt resumable distillation state (the 2 latest)
      distill.json         distillation settings + student-vs-teacher distances

run.json is written last by ``personalize`` (its presence marks a complete run); distill.json is
written last by ``distill``.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from o2n_edge._lazy import require
from o2n_edge.atomic import AtomicDir, atomic_open, atomic_path, atomic_write_json
from o2n_edge.profiles import DiffusionSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from o2n_edge.diffusion.models import DiffusionModels

RUN_JSON = "run.json"
DISTILL_JSON = "distill.json"
SHOTS_NPY = "shots.npy"
PROMPT_NPY = "prompt_embeds.npy"
CHECKPOINTS = "checkpoints"
STUDENT = "student"
LORA = "lora"
LORA_FILE = "pytorch_lora_weights.safetensors"
KEEP_CHECKPOINTS = 2


@dataclass(frozen=True)
class RunDir:
    """Paths inside a run directory (one place that knows the layout)."""

    root: Path

    @property
    def run_json(self) -> Path:
        return self.root / RUN_JSON

    @property
    def distill_json(self) -> Path:
        return self.root / DISTILL_JSON

    @property
    def shots(self) -> Path:
        return self.root / SHOTS_NPY

    @property
    def prompt_embeds(self) -> Path:
        return self.root / PROMPT_NPY

    @property
    def scheduler(self) -> Path:
        return self.root / "scheduler"

    @property
    def unet(self) -> Path:
        return self.root / "unet"

    @property
    def vae(self) -> Path:
        return self.root / "vae"

    @property
    def lora(self) -> Path:
        return self.root / LORA

    @property
    def class_latents(self) -> Path:
        return self.root / "class_latents.pt"

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def distill_checkpoints(self) -> Path:
        return self.root / "distill_checkpoints"

    @property
    def student(self) -> Path:
        return self.root / STUDENT

    @property
    def student_unet(self) -> Path:
        return self.root / STUDENT / "unet"

    @property
    def student_lora(self) -> Path:
        return self.root / STUDENT / LORA

    def latest_checkpoint(self) -> Path | None:
        """Newest ``checkpoints/step_*.pt`` (by step number), or None."""
        if not self.checkpoints.is_dir():
            return None
        found = sorted(self.checkpoints.glob("step_*.pt"))
        return found[-1] if found else None

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:06d}.pt"


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------


def write_json_atomic(path: Path, data: dict[str, Any]) -> Path:
    """Write JSON (numpy values allowed) whole or not at all, so readers never see half a file."""
    return atomic_write_json(path, data, indent=2, sort_keys=False, default=_json_default)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def save_npy_atomic(path: Path, array: np.ndarray) -> Path:
    """``np.save`` whole or not at all (written through a handle: no ``.npy`` is appended)."""
    with atomic_open(path, "wb") as fh:
        np.save(fh, array)
    return Path(path)


def torch_save_atomic(obj: Any, path: Path) -> Path:
    """``torch.save`` whole or not at all (checkpoints survive a kill mid-write)."""
    torch = require("torch", "checkpoints")
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def atomic_dir(path: Path) -> AtomicDir:
    """``with atomic_dir(path) as tmp``: a temp dir next to ``path`` that replaces it on success.

    On an exception the temp dir is removed and ``path`` is left as it was.
    """
    return AtomicDir(path)


def prune_checkpoints(rd: RunDir, keep: int = KEEP_CHECKPOINTS) -> None:
    """Remove all but the ``keep`` newest checkpoints."""
    found = sorted(rd.checkpoints.glob("step_*.pt"))
    for old in found[:-keep] if keep > 0 else found:
        with contextlib.suppress(FileNotFoundError):
            old.unlink()


# --------------------------------------------------------------------------------------------
# Progress and versions
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def progress_bar(total: int, description: str, enabled: bool = True) -> Iterator[Any]:
    """A rich progress bar with a ``loss`` field; yields ``advance(n=1, **fields)``.

    Disabled, it yields a no-op so the training loops stay the same.
    """
    if not enabled or total <= 0:
        yield lambda n=1, **kw: None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as prog:
        task = prog.add_task(description, total=total, info="")

        def advance(n: int = 1, **kw: Any) -> None:
            info = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in kw.items())
            prog.update(task, advance=n, info=info)

        yield advance


def versions() -> dict[str, str]:
    """Versions of the libraries that produced an artifact (recorded in run.json/distill.json)."""
    import importlib.metadata as md

    out: dict[str, str] = {}
    for name in ("o2n-edge", "torch", "diffusers", "peft", "transformers", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


def spec_to_dict(spec: DiffusionSpec) -> dict[str, Any]:
    """The DiffusionSpec as plain JSON (stored in run.json so a run reloads with its own spec)."""
    return {f.name: getattr(spec, f.name) for f in fields(spec)}


def spec_from_dict(data: dict[str, Any]) -> DiffusionSpec:
    """Inverse of :func:`spec_to_dict`, ignoring unknown keys (forward compatible)."""
    names = {f.name for f in fields(DiffusionSpec)}
    return DiffusionSpec(**{k: v for k, v in data.items() if k in names})


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON file; a missing one is a FileNotFoundError naming what produces it."""
    path = Path(path)
    if not path.is_file():
        hint = "run `personalize` first" if path.name == RUN_JSON else "run `distill` first"
        raise FileNotFoundError(f"{path} not found: {hint}")
    return json.loads(path.read_text())


# --------------------------------------------------------------------------------------------
# Loading a run
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedRun:
    """A personalized run, ready to transform/generate/export.

    ``models.unet`` is the personalized *teacher* (sd15: base UNet with the personalization LoRA
    fused); ``student`` is the distilled few-step UNet when ``distill`` has run, else None.
    """

    run_dir: Path
    spec: DiffusionSpec
    models: DiffusionModels
    prompt_embeds: torch.Tensor  # [1, L, D] float32
    info: dict[str, Any]
    shots: np.ndarray  # uint8 (k, S, S, 3)
    student: Any | None = None
    distill_info: dict[str, Any] = field(default_factory=dict)

    @property
    def category(self) -> str:
        return str(self.info.get("category", ""))

    @property
    def prompt(self) -> str:
        return str(self.info.get("prompt", ""))

    @property
    def image_size(self) -> int:
        return int(self.spec.image_size)

    def unet_for(self, use_student: bool) -> Any:
        """The student when asked for and present, else the teacher."""
        if use_student and self.student is not None:
            return self.student
        return self.models.unet


def fuse_sd15_lora(models: DiffusionModels, lora_path: Path, adapter: str = "personal",
                   scale: float = 1.0) -> None:
    """Load a diffusers-format LoRA into ``models.unet`` through the SD pipeline API and fuse it.

    Going through ``StableDiffusionPipeline.load_lora_weights`` proves the saved format is the one
    other SD tools load.
    """
    diffusers = require("diffusers", "the sd15 LoRA")
    pipe = diffusers.StableDiffusionPipeline(
        vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
        unet=models.unet, scheduler=diffusers.DDPMScheduler.from_config(models.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.load_lora_weights(str(lora_path), adapter_name=adapter)
    pipe.fuse_lora(lora_scale=scale, adapter_names=[adapter])
    pipe.unload_lora_weights()


def load_run(run_dir: Path | str, load_student: bool = True, device: str | None = None) -> LoadedRun:
    """Load a run dir: networks with the personalization applied, prompt, spec, student if present.

    Networks go to ``device`` (default: CUDA when available, else CPU) in eval mode, frozen.
    """
    torch = require("torch", "loading a run")
    diffusers = require("diffusers", "loading a run")
    from o2n_edge.diffusion.models import DiffusionModels, build_models

    rd = RunDir(Path(run_dir))
    info = read_json(rd.run_json)
    spec = spec_from_dict(info["spec"])
    if spec.kind == "lite":  # runs of an earlier version: lite is now the memory-bank detector
        raise ValueError(f"run {rd.root} was made with profile 'lite', which has no diffusion model any "
                         f"more (it is the memory-bank detector): personalize again with --profile tiny or sd15")
    prompt_embeds = torch.from_numpy(np.load(rd.prompt_embeds)).float()
    shots = np.load(rd.shots) if rd.shots.is_file() else np.zeros((0, spec.image_size, spec.image_size, 3), np.uint8)
    sched_cfg = dict(diffusers.DDPMScheduler.load_config(rd.scheduler)) if rd.scheduler.is_dir() else {}
    sched_cfg = {k: v for k, v in sched_cfg.items() if not k.startswith("_")}
    if spec.kind == "tiny":
        unet = diffusers.UNet2DConditionModel.from_pretrained(rd.unet)
        vae = diffusers.AutoencoderKL.from_pretrained(rd.vae)
        models = DiffusionModels(
            unet=unet, vae=vae,
            prompt_dim=int(unet.config.cross_attention_dim),
            prompt_len=int(prompt_embeds.shape[1]),
            latent_channels=int(vae.config.latent_channels),
            vae_scale=2 ** (len(vae.config.block_out_channels) - 1),
            scaling_factor=float(vae.config.scaling_factor),
            scheduler_config=sched_cfg, kind=spec.kind, prompt_embeds=prompt_embeds,
        )
    elif spec.kind == "sd15":
        models = build_models(spec)
        if sched_cfg:
            models.scheduler_config = sched_cfg
        fuse_sd15_lora(models, rd.lora, scale=float(info.get("personal_lora_scale", 1.0)))
        models.prompt_embeds = prompt_embeds
    else:
        raise ValueError(f"run {rd.root} has unknown kind {spec.kind!r}")
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for m in (models.unet, models.vae, models.text_encoder):
        if m is not None:
            m.requires_grad_(False).eval().to(dev)
    student = None
    distill_info: dict[str, Any] = {}
    if load_student and (rd.student_unet / "config.json").is_file():
        student = diffusers.UNet2DConditionModel.from_pretrained(rd.student_unet)
        student.requires_grad_(False).eval().to(dev)
        if rd.distill_json.is_file():
            distill_info = json.loads(rd.distill_json.read_text())
    return LoadedRun(run_dir=rd.root, spec=spec, models=models, prompt_embeds=prompt_embeds,
                     info=info, shots=shots, student=student, distill_info=distill_info)
