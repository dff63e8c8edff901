"""Names users already have: Hugging Face hub ids resolved through the hub's own cache.

Why: an SD-1.5 user knows ``stable-diffusion-v1-5/stable-diffusion-v1-5`` and
``latent-consistency/lcm-lora-sdv1-5``, and already has them in ``~/.cache/huggingface``; asking
for a local directory instead makes every user find and copy snapshot folders by hand. So every
sd15 weight option takes a local path *or* a hub id, and a hub id is resolved by
``huggingface_hub`` (the cache diffusers, transformers and open_clip share), honouring
``HF_HOME`` / ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE``. The environment is read at call time (not
at import, as ``huggingface_hub.constants`` does), so a shell or test that sets it later is obeyed.

Offline with a file missing, the error is one line: what is missing, where we looked, and the
exact ``hf download`` command that fetches it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from o2n_edge._lazy import require

# What the sd15 base model needs from a diffusers SD-1.5 repo (one weight variant each; the public
# repo also holds .bin, fp16, ema and single-file variants nobody here needs).
SD15_PATTERNS = (
    "model_index.json",
    "scheduler/*.json",
    "tokenizer/*",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
)
# A diffusers single-model repo (e.g. madebyollin/taesd).
DIFFUSERS_MODEL_PATTERNS = ("config.json", "diffusion_pytorch_model.safetensors")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
OPEN_CLIP_PATTERNS = ("open_clip_config.json", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_TRUE = ("1", "ON", "YES", "TRUE")


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as set now."""
    return any(os.environ.get(v, "").upper() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_cache_dir() -> Path:
    """The hub cache as the environment says now: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface")
    return Path(home).expanduser() / "hub"


def looks_like_hub_id(value: str) -> bool:
    """``org/name`` that is not an existing local path (a local path always wins)."""
    return bool(_HUB_ID.match(value)) and not Path(value).expanduser().exists()


def fetch_command(repo_id: str, patterns: Sequence[str] = ()) -> str:
    """The ``hf download`` line that puts what we need into the cache (``hf`` ships with huggingface_hub)."""
    include = "".join(f" --include '{p}'" for p in patterns)
    return f"hf download {repo_id}{include}"


class HubFileMissing(FileNotFoundError):
    """A hub file is not in the cache and we may not (or cannot) download it."""


def _missing(what: str, repo_id: str, patterns: Sequence[str], detail: str = "") -> HubFileMissing:
    mode = "HF_HUB_OFFLINE=1" if is_offline() else "download failed"
    extra = f" ({detail})" if detail else ""
    return HubFileMissing(
        f"{what} {repo_id!r} is not in the Hugging Face cache {hub_cache_dir()} [{mode}]{extra}; "
        f"fetch it with: {fetch_command(repo_id, patterns)}")


def snapshot(repo_id: str, patterns: Sequence[str], what: str, required: Sequence[str] = ()) -> Path:
    """Local snapshot dir of ``repo_id`` holding ``patterns``; ``required`` files must exist in it.

    Offline, ``snapshot_download`` returns the cached snapshot folder without checking files, so
    the required ones are checked here: a half-fetched cache fails with the command that fixes it.
    """
    hub = require("huggingface_hub", f"the hub id {repo_id}")
    try:
        path = Path(hub.snapshot_download(repo_id, allow_patterns=list(patterns), cache_dir=str(hub_cache_dir()),
                                          local_files_only=is_offline()))
    except Exception as exc:  # noqa: BLE001 - LocalEntryNotFound, RepositoryNotFound, network errors
        raise _missing(what, repo_id, patterns, type(exc).__name__) from exc
    absent = [f for f in required if not (path / f).is_file()]
    if absent:
        raise _missing(what, repo_id, patterns, f"lacks {', '.join(absent)}")
    return path


def hub_file(repo_id: str, filename: str, what: str) -> Path:
    """One file of a hub repo from the cache (downloaded only when online)."""
    hub = require("huggingface_hub", f"the hub id {repo_id}")
    try:
        return Path(hub.hf_hub_download(repo_id, filename, cache_dir=str(hub_cache_dir()),
                                        local_files_only=is_offline()))
    except Exception as exc:  # noqa: BLE001
        raise _missing(what, repo_id, [filename], type(exc).__name__) from exc


def resolve_sd15(value: str) -> Path:
    """``--base-model``: a local diffusers dir, or a hub id resolved to its cached snapshot."""
    if not looks_like_hub_id(value):
        return Path(value).expanduser()
    required = [p for p in SD15_PATTERNS if "*" not in p]
    return snapshot(value, SD15_PATTERNS, "sd15 base model", required)


def resolve_lora(value: str, what: str = "LCM-LoRA") -> Path:
    """``--lcm-lora``: a local file/dir, or a hub id -> its cached ``pytorch_lora_weights.safetensors``."""
    if not looks_like_hub_id(value):
        path = Path(value).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{what} {str(path)!r} not found: pass a local diffusers-format LoRA "
                                    f"file or dir, or a hub id such as latent-consistency/lcm-lora-sdv1-5")
        return path
    return hub_file(value, LORA_WEIGHT_NAME, what)


def resolve_diffusers_model(value: str, what: str) -> Path:
    """A diffusers single-model dir (config.json + weights): local, or a hub id's snapshot."""
    if not looks_like_hub_id(value):
        path = Path(value).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{what} {str(path)!r} has no config.json: pass a diffusers model "
                                    "directory or a hub id such as madebyollin/taesd")
        return path
    return snapshot(value, DIFFUSERS_MODEL_PATTERNS, what, DIFFUSERS_MODEL_PATTERNS)


def seed_hub_cache(repo_id: str, src: Path | str, cache_dir: Path | str | None = None,
                   revision: str = "0" * 40) -> Path:
    """Lay ``src`` (a file or a folder) out as ``repo_id``'s cached snapshot; returns the snapshot dir.

    The layout is the hub cache's own (``models--org--name/snapshots/<rev>/...`` and
    ``refs/main``), so ``huggingface_hub`` resolves it offline exactly as a downloaded repo. Tests
    and the real-size dry run build their caches with it from seeded models: nothing is fetched.
    Files are hard-linked where possible (a 3.4 GB UNet is not copied).
    """
    import shutil

    cache = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    src = Path(src)
    files = [src] if src.is_file() else [f for f in src.rglob("*") if f.is_file()]
    for f in files:
        target = snap / (f.name if src.is_file() else f.relative_to(src))
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target.unlink()
        try:
            os.link(f, target)
        except OSError:
            shutil.copy2(f, target)
    return snap
