"""Latent-space operations of the one-to-normal transform that run outside the graphs (numpy).

Why: the lite transform keeps the query's low latent frequencies (its brightness and contrast)
and takes only the local detail from the denoiser. That mixes two tensors (the query's latent and
the denoised one), so it cannot live inside the UNet graph; it is two small matrix products here,
and the torch reference (``o2n_edge.diffusion.lite.keep_low_frequencies``) applies the very same
matrices, so runtime and reference agree to float rounding.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=16)
def lowpass_matrix(size: int, sigma: float) -> np.ndarray:
    """(size, size) float32 matrix of a normalized 1-D gaussian (4 sigma) with reflect padding."""
    if sigma <= 0:
        return np.eye(size, dtype=np.float32)
    radius = max(1, int(4.0 * sigma + 0.5))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    m = np.zeros((size, size))
    for i in range(size):
        for t in range(-radius, radius + 1):
            j = i + t
            # reflect without repeating the edge (numpy 'reflect' / torch 'reflect'), folded as needed
            while j < 0 or j >= size:
                j = -j if j < 0 else 2 * (size - 1) - j
            m[i, j] += k[t + radius]
    return m.astype(np.float32)


def keep_low_frequencies(denoised: np.ndarray, source: np.ndarray, sigma: float) -> np.ndarray:
    """``denoised - G(denoised) + G(source)`` over the last two axes of (B,C,H,W) latents."""
    if sigma <= 0:
        return denoised
    h, w = denoised.shape[-2:]
    gy, gx = lowpass_matrix(h, float(sigma)), lowpass_matrix(w, float(sigma))

    def low(x: np.ndarray) -> np.ndarray:
        return np.einsum("ih,bchw,jw->bcij", gy, x.astype(np.float32), gx, optimize=True)

    return (denoised - low(denoised) + low(source)).astype(np.float32)
