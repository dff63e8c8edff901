"""Personalized runs for evaluation: one run per (shots, seed), or one given run for all.

A run is personalized on exactly the shots the evaluation draws, distilled, and then gives the
two things the triplet scoring needs from diffusion: the generated anomaly-free pool and the
normal version of any image. Runs are cached under ``runs_dir`` and resumed, so an interrupted
ablation picks up where it stopped instead of retraining.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from o2n_edge.data import Dataset, load_image
from o2n_edge.evaluation import PersonalizedViews
from o2n_edge.profiles import Profile

DEFAULT_RUNS_DIR = Path("runs")


def run_name(ds: Dataset, profile: Profile, shots: int, seed: int) -> str:
    """Cache key of a run: what it was trained on."""
    return f"{ds.name}-{ds.category}-{profile.name}-k{shots}-s{seed}"


def ensure_run(
    shot_paths: list[Path],
    category: str,
    profile: Profile,
    run_dir: Path,
    seed: int,
    progress: bool = True,
    personalize_steps: int | None = None,
    distill_steps: int | None = None,
    lcm_lora: str | None = None,
    lcm_lora_scale: float = 1.0,
) -> dict:
    """Personalize (resuming) and distil into ``run_dir`` unless already done; returns wall times.

    sd15 with ``lcm_lora`` (a local file or hub id): the student is the LCM-LoRA merged with the
    personalization LoRA instead of a distilled one.
    """
    from o2n_edge.diffusion.distill import distill  # the submodules share these names: import the functions
    from o2n_edge.diffusion.personalize import personalize
    from o2n_edge.diffusion.run_dir import RunDir

    spec = profile.require_diffusion("personalize")
    rd = RunDir(run_dir)
    info: dict = {}
    size = spec.image_size
    if not rd.run_json.is_file():
        t = time.perf_counter()
        shots = [load_image(p, size) for p in shot_paths]
        personalize(shots, category, spec, run_dir, steps=personalize_steps, seed=seed, progress=progress)
        info["personalize_s"] = round(time.perf_counter() - t, 2)
    if not rd.distill_json.is_file():
        t = time.perf_counter()
        distill(run_dir, steps=distill_steps, num_inference_steps=spec.steps, progress=progress, seed=seed,
                lcm_lora=lcm_lora or None, lcm_lora_scale=lcm_lora_scale)
        info["distill_s"] = round(time.perf_counter() - t, 2)
    return info


def make_normal_provider(
    ds: Dataset,
    profile: Profile,
    run_dir: Path | None = None,
    pool_size: int | None = None,
    progress: bool = True,
    runs_dir: Path = DEFAULT_RUNS_DIR,
    transform_seed: int = 0,
    personalize_steps: int | None = None,
    distill_steps: int | None = None,
):
    """A :class:`o2n_edge.evaluation.NormalProvider`: a fixed run, or one personalized per shots/seed."""
    from o2n_edge.diffusion import generate_pool, load_run, one_to_normal

    n_pool = profile.require_diffusion("a personalized run").pool_size if pool_size is None else int(pool_size)
    fixed = load_run(run_dir) if run_dir is not None else None

    def provider(shot_paths: list[Path], shots: int, seed: int) -> PersonalizedViews:
        info: dict = {}
        if fixed is not None:
            run = fixed
        else:
            target = runs_dir / run_name(ds, profile, shots, seed)
            info.update(ensure_run(shot_paths, ds.category, profile, target, seed, progress,
                                   personalize_steps, distill_steps))
            run = load_run(target)
        t = time.perf_counter()
        pool = generate_pool(run, n_pool, seed=seed, progress=progress) if n_pool > 0 else None
        info["pool_s"] = round(time.perf_counter() - t, 2)
        info["pool_size"] = n_pool
        info["run_dir"] = str(run.run_dir)

        def normal_of(images: np.ndarray) -> np.ndarray:
            return one_to_normal(run, images, seed=transform_seed).normals

        return PersonalizedViews(pool=pool, normal_of=normal_of, info=info)

    return provider
