"""TAESD as the sd15 transform's VAE: diffusers' ``AutoencoderTiny`` behind the AutoencoderKL interface.

Why: the SD-1.5 VAE decoder is the costliest graph of the transform after the UNet (tens of
GFLOPs per image even at 256 px); TAESD (madebyollin/taesd, ~2.4 M parameters per half) decodes
the same latent space at a fraction of that cost, with some loss of detail. It is a choice
(``o2n-edge export --vae madebyollin/taesd``), recorded in the manifest, never a silent swap.

TAESD's latents are already in the UNet's (scaled) latent space: its ``scaling_factor`` is 1,
where the SD VAE's is 0.18215 on the posterior mean. :class:`TAESDVae` gives it the small part of
``AutoencoderKL``'s interface the rest of the code drives (``encode(x).latent_dist.mean``,
``decode(z).sample``, ``config``), pixels in [-1, 1] (diffusers converts to TAESD's [0, 1]
inside), so personalization's latents, the transform, the export specs and the runtime are the
same code path as with the full VAE.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from o2n_edge._lazy import require

torch = require("torch", "TAESD")

KIND = "taesd"


class _Posterior:
    """A deterministic 'posterior': TAESD's encoder gives one latent, no variance."""

    def __init__(self, mean: Any) -> None:
        self.mean = mean
        self.std = torch.zeros_like(mean)

    def sample(self, generator: Any = None) -> Any:
        return self.mean


class TAESDVae(torch.nn.Module):
    """``AutoencoderTiny`` with AutoencoderKL's interface (see the module docstring)."""

    def __init__(self, tiny: Any, source: str = "") -> None:
        super().__init__()
        self.tiny = tiny
        self.source = source
        c = tiny.config
        self.config = SimpleNamespace(
            kind=KIND, scaling_factor=1.0, shift_factor=0.0, latent_channels=int(c.latent_channels),
            block_out_channels=tuple(c.encoder_block_out_channels), source=source,
        )

    @property
    def dtype(self) -> Any:
        return next(self.tiny.parameters()).dtype

    @property
    def device(self) -> Any:
        return next(self.tiny.parameters()).device

    def encode(self, pixels: Any, return_dict: bool = True) -> Any:
        post = _Posterior(self.tiny.encode(pixels, return_dict=False)[0])
        return SimpleNamespace(latent_dist=post) if return_dict else (post,)

    def decode(self, latents: Any, return_dict: bool = True) -> Any:
        img = self.tiny.decode(latents, return_dict=False)[0]
        return SimpleNamespace(sample=img) if return_dict else (img,)

    def forward(self, pixels: Any) -> Any:
        return self.decode(self.encode(pixels).latent_dist.mean).sample


def load_taesd(value: str) -> TAESDVae:
    """A local diffusers ``AutoencoderTiny`` dir or a hub id (``madebyollin/taesd``) through the HF cache."""
    diffusers = require("diffusers", "TAESD")
    from o2n_edge.hub import resolve_diffusers_model

    path = resolve_diffusers_model(value, "TAESD")
    tiny = diffusers.AutoencoderTiny.from_pretrained(Path(path))
    return TAESDVae(tiny.eval().requires_grad_(False), source=value)


def use_taesd(models: Any, value: str) -> dict[str, Any]:
    """Swap ``models.vae`` (a :class:`~o2n_edge.diffusion.models.DiffusionModels`) for TAESD; returns the record.

    The latent space must match: same channels and down factor as the UNet's VAE, else a clear error.
    """
    vae = load_taesd(value)
    latent, factor = vae.config.latent_channels, 2 ** (len(vae.config.block_out_channels) - 1)
    if latent != models.latent_channels or factor != models.vae_scale:
        raise ValueError(f"TAESD {value!r} has {latent} latent channels at 1/{factor}, the model's VAE "
                         f"{models.latent_channels} at 1/{models.vae_scale}: not the same latent space")
    models.vae, models.scaling_factor = vae, 1.0
    return vae_record(vae)


def vae_record(vae: Any) -> dict[str, Any]:
    """What the manifest says about the transform's VAE."""
    cfg = getattr(vae, "config", None)
    kind = getattr(cfg, "kind", None) if cfg is not None and not isinstance(cfg, dict) else None
    if kind == KIND:
        return {"kind": KIND, "class": "AutoencoderTiny", "source": vae.source,
                "params": int(sum(p.numel() for p in vae.parameters()))}
    return {"kind": type(vae).__name__, "class": type(vae).__name__,
            "params": int(sum(p.numel() for p in vae.parameters()))}
