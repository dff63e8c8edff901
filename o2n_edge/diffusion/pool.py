"""The anomaly-free pool: extra normal images sampled from the personalized few-step model.

The pool branch's memory bank holds the shots' patch features plus the features of these
generated images, so nearest-neighbour scoring sees more normal variation than k shots show.

Two ways to start sampling:

- ``init="noise"``: pure noise, the personalized prompt, the student's LCM schedule at strength 1
  (the paper's pool: generated samples, most diverse).
- ``init="shots"``: a shot (cycled), noised to ``init_strength`` (0.8 by default) and denoised: less
  diverse but each image stays on the category's manifold even when the model is weak.

Default ``init="auto"``: ``noise`` for sd15 (a pretrained model generates faithful samples) and
``shots`` for tiny, whose model is trained from scratch on 1-8 images: a from-scratch model
sampled from pure noise gave 2 of 8 hazelnut samples as smeared, off-colour blobs (measured, 4
shots), which would put false normals into the memory bank; from shots at 0.8 all 8 were
plausible nuts.
"""

from __future__ import annotations

import numpy as np

from o2n_edge._lazy import require
from o2n_edge.diffusion.models import decode_latents, encode_latents, images_to_tensor, tensor_to_images
from o2n_edge.diffusion.run_dir import LoadedRun, progress_bar
from o2n_edge.diffusion.transform import lcm_denoise, lcm_scheduler, lcm_timesteps

POOL_INITS = ("auto", "noise", "shots")
SHOT_INIT_STRENGTH = 0.8


def default_init(run: LoadedRun) -> str:
    """``noise`` for sd15, ``shots`` for the from-scratch profiles (see the module docstring)."""
    return "noise" if run.spec.kind == "sd15" else "shots"


def generate_pool(
    run: LoadedRun,
    n: int,
    seed: int = 0,
    steps: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    init: str = "auto",
    init_strength: float = SHOT_INIT_STRENGTH,
) -> np.ndarray:
    """``n`` generated anomaly-free images, uint8 (n, S, S, 3) at the diffusion image size.

    Uses the student (LCMScheduler, ``steps`` default ``spec.steps``) when present, else the
    teacher on the same schedule. Image i depends only on (seed, i): a larger ``n`` extends the
    pool without changing its first images.
    """
    torch = require("torch", "pool generation")
    if n < 0:
        raise ValueError(f"pool size must be >= 0, got {n}")
    if init not in POOL_INITS:
        raise ValueError(f"init must be one of {', '.join(POOL_INITS)}, got {init!r}")
    size = run.spec.image_size
    if n == 0:
        return np.zeros((0, size, size, 3), np.uint8)
    init = default_init(run) if init == "auto" else init
    if init == "shots" and len(run.shots) == 0:
        raise ValueError("init='shots' needs the run's shots.npy; use init='noise'")
    steps = run.spec.steps if steps is None else int(steps)
    unet = run.unet_for(True)
    vae, sf = run.models.vae, run.models.scaling_factor
    dev = next(unet.parameters()).device
    sched = lcm_scheduler(run)
    strength = 1.0 if init == "noise" else float(init_strength)
    ts = lcm_timesteps(sched, steps, strength)
    h = size // run.models.vae_scale
    shape = (run.models.latent_channels, h, h)
    shot_lat = None
    if init == "shots":
        shot_lat = encode_latents(vae, images_to_tensor(run.shots).to(dev), sf).to(dev)
    out = []
    with progress_bar(n, f"pool ({init})", progress) as advance:
        for i in range(0, n, batch_size):
            ids = list(range(i, min(n, i + batch_size)))
            gens = [torch.Generator().manual_seed(seed * 1_000_003 + j) for j in ids]
            init_noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(dev)
            step_noise = [torch.stack([torch.randn(shape, generator=g) for g in gens]).to(dev)
                          for _ in range(len(ts) - 1)]
            if shot_lat is None:
                # As LatentConsistencyModelPipeline: latents = noise * init_noise_sigma.
                lat = init_noise * float(sched.init_noise_sigma)
            else:
                src = shot_lat[[j % len(shot_lat) for j in ids]]
                lat = sched.add_noise(src, init_noise, torch.tensor([ts[0]], device=dev))
            den = lcm_denoise(unet, lat, ts, run.prompt_embeds, sched, step_noise)
            out.append(tensor_to_images(decode_latents(vae, den, sf)))
            advance(len(ids))
    return np.concatenate(out)

