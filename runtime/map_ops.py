"""Map geometry of the scoring, in numpy: upsampling, smoothing, border rings, top-k.

Split from :mod:`o2n_edge.runtime.scoring` (which re-exports these names) so the scorer reads as
the triplet maths alone. Upsampling (bilinear, align_corners=False) and gaussian smoothing
(reflect padding) are both linear and separable, so they are folded into one (S, h) matrix ``A``
and applied as ``A @ map @ A.T``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


def gaussian_kernel1d(sigma: float) -> np.ndarray:
    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32).astype(np.float64)


def bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """(out, in) matrix of torch's bilinear interpolation with align_corners=False."""
    m = np.zeros((out_size, in_size))
    scale = in_size / out_size
    for i in range(out_size):
        src = max(scale * (i + 0.5) - 0.5, 0.0)
        i0 = int(src)
        i1 = i0 + 1 if i0 < in_size - 1 else i0
        lam = src - i0
        m[i, i0] += 1.0 - lam
        m[i, i1] += lam
    return m


def gaussian_matrix(size: int, sigma: float) -> np.ndarray:
    """(size, size) matrix of a 'reflect'-padded 1-D gaussian convolution."""
    if sigma <= 0:
        return np.eye(size)
    k = gaussian_kernel1d(sigma)
    r = (len(k) - 1) // 2
    assert r < size, f"smoothing radius {r} needs an image larger than {size}"
    m = np.zeros((size, size))
    for i in range(size):
        for t in range(-r, r + 1):
            j = i + t
            if j < 0:
                j = -j
            elif j >= size:
                j = 2 * (size - 1) - j
            m[i, j] += k[t + r]
    return m


@lru_cache(maxsize=16)
def upsample_smooth_matrix(out_size: int, in_size: int, sigma: float) -> np.ndarray:
    """One (S, h) matrix: bilinear upsampling then gaussian smoothing."""
    return (gaussian_matrix(out_size, sigma) @ bilinear_matrix(out_size, in_size)).astype(np.float64)


def upsample_and_smooth(grid_maps: np.ndarray, size: int, sigma: float) -> np.ndarray:
    """(B,h,w) -> (B,S,S)."""
    b, h, w = grid_maps.shape
    ay = upsample_smooth_matrix(size, h, sigma)
    ax = ay if w == h else upsample_smooth_matrix(size, w, sigma)
    return np.einsum("sh,bhw,tw->bst", ay, grid_maps.astype(np.float64), ax, optimize=True)


def ring_index(h: int, w: int, rings: int) -> np.ndarray:
    """(h,w): each grid cell's distance to the nearest edge, capped at ``rings`` (the interior)."""
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.minimum(np.minimum(np.minimum(i, j), np.minimum(h - 1 - i, w - 1 - j)), rings)


@lru_cache(maxsize=16)
def ring_constants(ring_norm: tuple[tuple[float, float], ...], h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(center, scale) maps (h,w) of per-ring standardization constants."""
    table = np.asarray(ring_norm, dtype=np.float64)
    idx = ring_index(h, w, len(table) - 1)
    return table[idx, 0], table[idx, 1]


def topk_mean(maps: np.ndarray, fraction: float) -> np.ndarray:
    flat = maps.reshape(maps.shape[0], -1)
    k = max(1, int(round(fraction * flat.shape[1])))
    return np.partition(flat, flat.shape[1] - k, axis=1)[:, -k:].mean(axis=1)
