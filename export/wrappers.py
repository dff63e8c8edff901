"""Wrappers that make each submodel export-friendly, one per ONNX graph.

Why: diffusers models return dataclasses, take keyword flags and sample from distributions; an
ONNX graph needs positional tensors in, a fixed tuple out, and no randomness. Each wrapper states
the exact numeric contract the torch-free runtime relies on. (Their source is hashed into the
export's input hash by ``specs.py``, so editing one invalidates cached exports.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from o2n_edge._lazy import require
from o2n_edge.encoders.onnx_runner import EncoderWrapper  # noqa: F401  (re-exported: the offline encoding traces it too)

torch = require("torch", "the ONNX export")
nn = torch.nn


def _config_get(model: Any, key: str, default: Any = None) -> Any:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


class UNetWrapper(nn.Module):
    """(sample, timestep[B], encoder_hidden_states[, timestep_cond]) -> noise_pred.

    ``timestep`` is a per-sample vector (float32 by default, int64 optional) so a batch can
    mix timesteps; ``timestep_cond`` exists only for UNets with ``time_cond_proj_dim`` (LCM's
    guidance embedding, computed in numpy by the runtime).
    """

    def __init__(self, unet: Any) -> None:
        super().__init__()
        self.unet = unet
        self.has_cond = _config_get(unet, "time_cond_proj_dim") is not None

    def forward(self, sample: Any, timestep: Any, encoder_hidden_states: Any, timestep_cond: Any = None) -> Any:
        return self.unet(
            sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond, return_dict=False
        )[0]


class _ScaledVae(nn.Module):
    """A VAE plus the latent scaling constants both VAE graphs bake in."""

    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(_config_get(vae, "scaling_factor", 1.0))
        self.shift_factor = float(_config_get(vae, "shift_factor", None) or 0.0)

    def extra_repr(self) -> str:
        return f"scaling_factor={self.scaling_factor}, shift_factor={self.shift_factor}"


class VaeEncoderWrapper(_ScaledVae):
    """pixels in [-1, 1] (B,3,S,S) -> scaled latent MEAN (B,C,S/f,S/f).

    Deterministic on purpose: the one-to-normal transform encodes the query and then adds its
    own seeded noise, so sampling the posterior would only add irreproducible noise. Output is
    ``(mean - shift_factor) * scaling_factor`` (shift 0 for SD-1.5), i.e. already in the UNet's
    latent space: the runtime never needs the VAE's constants.
    """

    def forward(self, pixels: Any) -> Any:
        mean = self.vae.encode(pixels).latent_dist.mean
        return (mean - self.shift_factor) * self.scaling_factor


class VaeDecoderWrapper(_ScaledVae):
    """scaled latents (B,C,s,s) -> pixels (B,3,s*f,s*f), nominally in [-1, 1], NOT clamped.

    Undoes :class:`VaeEncoderWrapper`'s scaling (``z / scaling_factor + shift_factor``) inside
    the graph; clamping and uint8 conversion are left to the runtime so errors stay visible.
    """

    def forward(self, latent: Any) -> Any:
        z = latent / self.scaling_factor + self.shift_factor
        return self.vae.decode(z, return_dict=False)[0]


class TextEncoderWrapper(nn.Module):
    """input_ids (B,L) int64 -> (last_hidden_state, pooler_output) of a CLIPTextModel-like model.

    Only needed to move prompt encoding to a device; the standard bundle stores the prompt's
    hidden states instead, so the runtime never runs a text encoder.
    """

    def __init__(self, text_model: Any) -> None:
        super().__init__()
        self.text_model = text_model

    def forward(self, input_ids: Any) -> tuple[Any, Any]:
        out = self.text_model(input_ids, return_dict=False)
        return out[0], out[1]
