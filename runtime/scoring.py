"""Triplet scoring in numpy: the runtime's port of ``o2n_edge.scoring`` (the torch reference).

The maths is the reference's, step for step; a parity test holds the two together. Two things
differ only in how they are computed, for speed on a line-side CPU:

- the nearest-neighbour search finds the neighbour with one float32 matrix product (numpy, or
  the pipeline's ONNX Runtime session: ``runtime.bank_search``) and then recomputes that
  neighbour's distance exactly in float64, so scores match the reference's float64 ``cdist``
  whichever search ran;
- upsampling (bilinear, align_corners=False) and gaussian smoothing (reflect padding) are both
  linear and separable, so they are folded into one (S, h) matrix ``A`` and applied as
  ``A @ map @ A.T``.

No torch here: this module runs on the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from o2n_edge.runtime.bank_search import NearestSearch, NumpyBankSearch

KNN_CHUNK = 1024  # query rows per GEMM chunk: bounds the (chunk x bank) distance matrix
TEXT_LOGIT_SCALE = 100.0
BRANCHES = ("personalized", "pool", "text")


@dataclass(frozen=True)
class ScoringParams:
    """The scoring constants of a bundle (manifest ``scoring`` section)."""

    branches: tuple[str, ...]
    weights: dict[str, float]
    image_size: int
    topk_fraction: float
    global_weight: float
    smoothing_sigma: float
    neighborhood: int
    norm: dict[str, tuple[float, float]] = field(default_factory=dict)
    stats_weight: float = 0.0  # global statistics branch; 0 = off (bundles before it)
    # branch -> [(center, scale)] per border ring of the grid, the interior last (none = scalar norm)
    ring_norm: dict[str, tuple[tuple[float, float], ...]] = field(default_factory=dict)

    @classmethod
    def from_manifest(cls, scoring: dict) -> "ScoringParams":
        """Build from the manifest's ``scoring`` dict; unknown branches are a bundle error upstream."""
        return cls(
            branches=tuple(scoring["branches"]),
            weights={k: float(v) for k, v in scoring["weights"].items()},
            image_size=int(scoring["image_size"]),
            topk_fraction=float(scoring["topk_fraction"]),
            global_weight=float(scoring["global_weight"]),
            smoothing_sigma=float(scoring["smoothing_sigma"]),
            neighborhood=int(scoring["neighborhood"]),
            norm={k: (float(v[0]), float(v[1])) for k, v in scoring.get("norm", {}).items()},
            stats_weight=float(scoring.get("stats_weight", 0.0)),
            ring_norm={k: tuple((float(c), float(sc)) for c, sc in v) for k, v in scoring.get("ring_norm", {}).items()},
        )


@dataclass
class RuntimeScores:
    scores: np.ndarray  # (B,) float64
    maps: np.ndarray  # (B, S, S) float32
    branch_maps: dict[str, np.ndarray]
    global_scores: dict[str, np.ndarray]
    stats: np.ndarray | None = None  # (B,) raw global-statistics distance (when on)


def knn_distance(queries: np.ndarray, bank: np.ndarray, search: NearestSearch | None = None) -> np.ndarray:
    """Exact nearest-neighbour L2 distance (float64) of each query row; ``search`` picks the row."""
    search = search or NumpyBankSearch(bank)
    q32 = queries.astype(np.float32, copy=False)
    out = np.empty(len(queries), dtype=np.float64)
    for start in range(0, len(queries), KNN_CHUNK):
        idx = search(q32[start : start + KNN_CHUNK])
        diff = queries[start : start + KNN_CHUNK].astype(np.float64) - bank[idx].astype(np.float64)
        out[start : start + KNN_CHUNK] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    return out


def pool_map(patch: np.ndarray, bank: np.ndarray, search: NearestSearch | None = None) -> np.ndarray:
    b, h, w, d = patch.shape
    return knn_distance(patch.reshape(-1, d), bank, search).reshape(b, h, w)


def personalized_map(patch: np.ndarray, normal_patch: np.ndarray, radius: int) -> np.ndarray:
    """Min distance to the normal version's patches within a (2r+1)^2 neighbourhood."""
    assert patch.shape == normal_patch.shape, (patch.shape, normal_patch.shape)
    b, h, w, _ = patch.shape
    q = patch.astype(np.float64)
    n = normal_patch.astype(np.float64)
    best = np.full((b, h, w), np.inf)
    for di in range(-radius, radius + 1):
        for dj in range(-radius, radius + 1):
            qi0, qi1 = max(0, -di), min(h, h - di)
            qj0, qj1 = max(0, -dj), min(w, w - dj)
            diff = q[:, qi0:qi1, qj0:qj1] - n[:, qi0 + di : qi1 + di, qj0 + dj : qj1 + dj]
            dist = np.sqrt(np.einsum("bijd,bijd->bij", diff, diff))
            np.minimum(best[:, qi0:qi1, qj0:qj1], dist, out=best[:, qi0:qi1, qj0:qj1])
    return best


def _normalize(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def text_probability(features: np.ndarray, text_features: np.ndarray) -> np.ndarray:
    """Probability of the anomalous ensemble: softmax over two logits = a logistic of their gap."""
    sims = _normalize(features) @ text_features.astype(np.float64).T
    gap = TEXT_LOGIT_SCALE * (sims[..., 0] - sims[..., 1])
    return 1.0 / (1.0 + np.exp(np.clip(gap, -700, 700)))


def cosine_distance_to_bank(g: np.ndarray, bank: np.ndarray) -> np.ndarray:
    return 1.0 - (_normalize(g) @ _normalize(bank).T).max(axis=1)


def feature_stats(patch: np.ndarray) -> np.ndarray:
    """(B,h,w,D) -> (B,2D): per-channel mean and (population) std over the image."""
    x = patch.astype(np.float64).reshape(patch.shape[0], -1, patch.shape[-1])
    return np.concatenate([x.mean(axis=1), x.std(axis=1)], axis=1)


def stats_distance(stats: np.ndarray, bank: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(B,2D) -> (B,): scaled L2 distance to the nearest row of the shots' statistics (RMS per dim)."""
    q = stats.astype(np.float64) / scale.astype(np.float64)
    b = bank.astype(np.float64) / scale.astype(np.float64)
    d2 = (q * q).sum(1, keepdims=True) - 2.0 * q @ b.T + (b * b).sum(1)[None, :]
    return np.sqrt(np.maximum(d2.min(axis=1), 0.0) / q.shape[1])


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


class Scorer:
    """Scores encoded queries against a bundle's reference; precomputes what it can once."""

    def __init__(
        self,
        params: ScoringParams,
        memory_bank: np.ndarray | None,
        global_bank: np.ndarray | None,
        text_features: np.ndarray | None = None,
        search: NearestSearch | None = None,
        stats_bank: np.ndarray | None = None,
        stats_scale: np.ndarray | None = None,
    ) -> None:
        """``search``: the bank search to use (e.g. ``OrtBankSearch``); numpy's when None."""
        self.params = params
        self.stats_bank, self.stats_scale = stats_bank, stats_scale
        if params.stats_weight > 0:
            assert stats_bank is not None and stats_scale is not None, "the statistics branch needs its bank"
        self.memory_bank = memory_bank
        self.global_bank = global_bank
        self.text_features = text_features
        self.search: NearestSearch | None = None
        if "pool" in params.branches:
            assert memory_bank is not None and global_bank is not None, "pool branch needs the memory bank"
            self.search = search or NumpyBankSearch(memory_bank)
        if "text" in params.branches:
            assert text_features is not None, "text branch needs text features"

    def branch_outputs(
        self,
        feats: dict[str, np.ndarray],
        normal_feats: dict[str, np.ndarray] | None = None,
        known: RuntimeScores | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Per-branch maps and global scores; branches already in ``known`` are taken from it.

        ``known``: scores of the same images from a scorer of a subset of the branches (the
        cascade's cheap pass), so a branch is never computed twice for one image.
        """
        p = self.params
        maps: dict[str, np.ndarray] = {}
        globals_: dict[str, np.ndarray] = {}
        if known is not None:
            for b in p.branches:
                if b in known.branch_maps:
                    maps[b], globals_[b] = known.branch_maps[b], known.global_scores[b]
        if "pool" in p.branches and "pool" not in maps:
            maps["pool"] = pool_map(feats["patch"], self.memory_bank, self.search)
            globals_["pool"] = cosine_distance_to_bank(feats["global"], self.global_bank)
        if "personalized" in p.branches and "personalized" not in maps:
            if normal_feats is None:
                raise ValueError("the personalized branch needs the normal versions' features")
            maps["personalized"] = personalized_map(feats["patch"], normal_feats["patch"], p.neighborhood)
            cos = np.einsum("bg,bg->b", _normalize(feats["global"]), _normalize(normal_feats["global"]))
            globals_["personalized"] = 1.0 - cos
        if "text" in p.branches and "text" not in maps:
            maps["text"] = text_probability(feats["patch_text"], self.text_features)
            globals_["text"] = text_probability(feats["global"], self.text_features)
        return maps, globals_

    def fuse(self, maps: dict[str, np.ndarray], globals_: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        p = self.params
        total = sum(p.weights[b] for b in p.branches)
        fused_map: np.ndarray | float = 0.0
        fused_global: np.ndarray | float = 0.0
        for b in p.branches:
            c, s = p.norm.get(b, (0.0, 1.0))
            if b in p.ring_norm:  # per border ring (scoring.py, border_fraction)
                c, s = ring_constants(p.ring_norm[b], *maps[b].shape[-2:])
            gc, gs = p.norm.get(f"global_{b}", (0.0, 1.0))
            w = p.weights[b] / total
            fused_map = fused_map + w * (maps[b] - c) / s
            fused_global = fused_global + w * (globals_[b] - gc) / gs
        return np.asarray(fused_map), np.asarray(fused_global)

    def score(
        self,
        feats: dict[str, np.ndarray],
        normal_feats: dict[str, np.ndarray] | None = None,
        known: RuntimeScores | None = None,
    ) -> RuntimeScores:
        """Fused image scores and maps (``known``: see :meth:`branch_outputs`)."""
        maps, globals_ = self.branch_outputs(feats, normal_feats, known)
        fused_map, fused_global = self.fuse(maps, globals_)
        full = upsample_and_smooth(fused_map, self.params.image_size, self.params.smoothing_sigma)
        scores = topk_mean(full, self.params.topk_fraction) + self.params.global_weight * fused_global
        stats = None
        if self.params.stats_weight > 0:
            stats = stats_distance(feature_stats(feats["patch"]), self.stats_bank, self.stats_scale)
            c, s = self.params.norm.get("global_stats", (0.0, 1.0))
            scores = scores + self.params.stats_weight * (stats - c) / s
        return RuntimeScores(scores=scores, maps=full.astype(np.float32), branch_maps=maps, global_scores=globals_,
                             stats=stats)
