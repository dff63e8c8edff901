"""Diffusion stage of One-to-Normal: personalize -> distil -> transform -> pool.

Importing this package does not import torch/diffusers (the ``build`` extra): every module here
imports them inside its functions through :func:`o2n_edge._lazy.require`, so a missing extra is
reported with the ``pip install 'o2n-edge[build]'`` hint when a function is first called.

The two training entry points share their module's name, so they are imported from the module
(re-exporting them here would shadow the submodules ``o2n_edge.diffusion.personalize`` and
``o2n_edge.diffusion.distill``)::

    from o2n_edge.diffusion.personalize import personalize
    from o2n_edge.diffusion.distill import distill
"""

from __future__ import annotations

from o2n_edge.diffusion.models import DiffusionModels, build_models
from o2n_edge.diffusion.pool import generate_pool
from o2n_edge.diffusion.run_dir import LoadedRun, RunDir, load_run
from o2n_edge.diffusion.transform import TransformResult, one_to_normal, transform_noise, transform_plan

__all__ = [
    "DiffusionModels",
    "LoadedRun",
    "RunDir",
    "TransformResult",
    "build_models",
    "generate_pool",
    "load_run",
    "one_to_normal",
    "transform_noise",
    "transform_plan",
]
