"""Diffusion stage of One-to-Normal: personalize -> distil -> transform -> pool.

Importing this package does not import torch/diffusers (the ``build`` extra): every module here
imports them inside its functions through :func:`o2n_edge._lazy.require`, so a missing extra is
reported with the ``pip install 'o2n-edge[build]'`` hint when a function is first called.
"""

from __future__ import annotations

from o2n_edge.diffusion.distill import distill, measure_distances
from o2n_edge.diffusion.models import (
    DiffusionModels,
    build_models,
    make_tiny_lora,
    make_tiny_sd15_checkpoint,
)
from o2n_edge.diffusion.personalize import AugmentConfig, personalize
from o2n_edge.diffusion.pool import generate_pool
from o2n_edge.diffusion.run_dir import LoadedRun, RunDir, load_run
from o2n_edge.diffusion.transform import TransformResult, one_to_normal, transform_noise, transform_plan

__all__ = [
    "AugmentConfig",
    "DiffusionModels",
    "LoadedRun",
    "RunDir",
    "TransformResult",
    "build_models",
    "distill",
    "generate_pool",
    "load_run",
    "make_tiny_lora",
    "make_tiny_sd15_checkpoint",
    "measure_distances",
    "one_to_normal",
    "personalize",
    "transform_noise",
    "transform_plan",
]
