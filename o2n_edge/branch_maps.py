"""Branch distance functions of the reference scoring (torch): what each branch measures.

Split from :mod:`o2n_edge.scoring` (which fuses these into scores and builds the reference from
the shots); the runtime's numpy port (``runtime/scoring.py``) mirrors every function here.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

KNN_CHUNK = 2048  # query patches per chunk of the nearest-neighbour search (bounds memory)
TEXT_LOGIT_SCALE = 100.0  # CLIP's logit scale, as WinCLIP uses it
# Global statistics branch: per-dimension scales of the shots' feature statistics are floored at
# this fraction of their median, so a dimension the few shots happen to agree on exactly does not
# turn any deviation in it into an infinite distance.
STATS_SCALE_FLOOR = 1.0


def _t(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


def knn_distance(queries: torch.Tensor, bank: torch.Tensor, chunk: int = KNN_CHUNK) -> torch.Tensor:
    """Nearest-neighbour L2 distance of each query row to the bank, chunked to bound memory.

    The neighbour is found with one float32 GEMM (||m||^2 - 2 q.m), then its distance is
    recomputed exactly in float64: the speed of a matrix product, the accuracy of cdist.
    """
    assert queries.ndim == 2 and bank.ndim == 2 and queries.shape[1] == bank.shape[1]
    b32 = bank.float()
    bank_sq = (b32 * b32).sum(dim=1)
    out = []
    for start in range(0, queries.shape[0], chunk):
        q = queries[start : start + chunk]
        idx = (bank_sq[None, :] - 2.0 * (q.float() @ b32.T)).argmin(dim=1)
        diff = q.double() - bank[idx].double()
        out.append(diff.pow(2).sum(dim=1).sqrt())
    return torch.cat(out).float()


def pool_map(patch: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """(B,h,w,D) -> (B,h,w) distance to the nearest memory-bank patch."""
    b, h, w, d = patch.shape
    return knn_distance(patch.reshape(-1, d), bank).reshape(b, h, w)


def personalized_map(patch: torch.Tensor, normal_patch: torch.Tensor, radius: int) -> torch.Tensor:
    """(B,h,w,D) x (B,h,w,D) -> (B,h,w): min distance to the normal version's nearby patches.

    The normal version is regenerated from noise, so it can be shifted by a patch; taking the
    minimum over a small neighbourhood keeps that from reading as an anomaly.
    """
    assert patch.shape == normal_patch.shape
    b, h, w, _ = patch.shape
    best = torch.full((b, h, w), math.inf, dtype=torch.float64)
    q = patch.double()
    n = normal_patch.double()
    for di in range(-radius, radius + 1):
        for dj in range(-radius, radius + 1):
            qi0, qi1 = max(0, -di), min(h, h - di)
            qj0, qj1 = max(0, -dj), min(w, w - dj)
            diff = q[:, qi0:qi1, qj0:qj1] - n[:, qi0 + di : qi1 + di, qj0 + dj : qj1 + dj]
            dist = diff.pow(2).sum(-1).sqrt()
            best[:, qi0:qi1, qj0:qj1] = torch.minimum(best[:, qi0:qi1, qj0:qj1], dist)
    return best.float()


def text_probability(features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """(..., G) -> (...): probability of the anomalous prompt ensemble (WinCLIP)."""
    f = F.normalize(features.double(), dim=-1)
    logits = TEXT_LOGIT_SCALE * f @ text_features.double().T
    return torch.softmax(logits, dim=-1)[..., 1].float()


def cosine_distance_to_bank(g: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """(B,G) x (S,G) -> (B,): 1 - the best cosine similarity."""
    sim = F.normalize(g.double(), dim=-1) @ F.normalize(bank.double(), dim=-1).T
    return (1.0 - sim.max(dim=1).values).float()


def feature_stats(patch: torch.Tensor) -> torch.Tensor:
    """(B,h,w,D) -> (B,2D): per-channel mean and std over the image (a texture descriptor).

    A whole-image defect (a colour cast, a blur, a wrong weave) shifts these statistics even when
    every single patch still has a close match somewhere in the memory bank.
    """
    x = patch.double().reshape(patch.shape[0], -1, patch.shape[-1])
    return torch.cat([x.mean(dim=1), x.std(dim=1, unbiased=False)], dim=1)


def stats_scale(bank: torch.Tensor) -> torch.Tensor:
    """(S,2D) -> (2D,): per-dimension std of the shots' statistics, floored at the median's share."""
    sd = bank.double().std(dim=0, unbiased=False) if bank.shape[0] > 1 else torch.zeros(bank.shape[1], dtype=torch.float64)
    floor = max(float(sd.median()) * STATS_SCALE_FLOOR, float(bank.double().abs().mean()) * 1e-3, 1e-6)
    return sd.clamp_min(floor)


def stats_distance(stats: torch.Tensor, bank: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(B,2D) -> (B,): scaled L2 distance to the nearest row of the shots' statistics (RMS per dim)."""
    q = stats.double() / scale.double()
    b = bank.double() / scale.double()
    d2 = (q * q).sum(1, keepdim=True) - 2.0 * q @ b.T + (b * b).sum(1)[None, :]
    return (d2.min(dim=1).values.clamp_min(0.0) / q.shape[1]).sqrt().float()
