"""Scheduler tables for the bundle: a diffusers LCMScheduler reduced to plain JSON data.

Why tables and not the diffusers config: the runtime has no diffusers and no torch, and the
schedule must be the *same numbers* the torch reference used (betas may come from a checkpoint's
``trained_betas`` or a zero-SNR rescale), so the exporter stores the computed ``alphas_cumprod``
and the handful of settings ``o2n_edge.runtime.scheduler.NumpyLCMScheduler.from_config`` reads.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from o2n_edge._lazy import require

SCHEDULER_TYPE = "LCMScheduler"


def lcm_tables(scheduler: Any) -> dict[str, Any]:
    """The JSON-serializable LCM tables of a ``diffusers.LCMScheduler`` (the manifest's ``scheduler``).

    Float values are the scheduler's float32 numbers written as Python floats, which JSON round
    trips exactly, so the runtime reproduces diffusers' schedule bit for bit in its inputs.
    """
    diffusers = require("diffusers", "exporting the LCM scheduler tables")
    if not isinstance(scheduler, diffusers.LCMScheduler):
        raise TypeError(
            f"lcm_tables needs a diffusers.LCMScheduler, got {type(scheduler).__name__}; "
            "convert with diffusers.LCMScheduler.from_config(scheduler.config)"
        )
    cfg = scheduler.config
    if cfg.thresholding:
        raise NotImplementedError(
            "the scheduler has thresholding=True, which the torch-free runtime does not implement; "
            "latent diffusion models do not use it: set thresholding=False"
        )
    alphas = np.asarray(scheduler.alphas_cumprod.detach().cpu().numpy(), dtype=np.float64)
    final_alpha = float(np.asarray(scheduler.final_alpha_cumprod.detach().cpu().numpy(), dtype=np.float64))
    return {
        "type": SCHEDULER_TYPE,
        "num_train_timesteps": int(cfg.num_train_timesteps),
        "original_inference_steps": int(cfg.original_inference_steps),
        "timestep_scaling": float(cfg.timestep_scaling),
        "prediction_type": str(cfg.prediction_type),
        "set_alpha_to_one": bool(cfg.set_alpha_to_one),
        "final_alpha_cumprod": final_alpha,
        "clip_sample": bool(cfg.clip_sample),
        "clip_sample_range": float(cfg.clip_sample_range),
        "thresholding": False,
        "alphas_cumprod": [float(v) for v in alphas],
    }
