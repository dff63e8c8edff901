"""Triplet contrastive scoring in numpy: the one implementation eval, export and the runtime share.

Three branches each give a patch-level map and a global score:

- ``pool``: query patches vs a memory bank of the shots' patch features (plus, after
  personalization, those of generated anomaly-free images); nearest-neighbour L2 distance.
- ``personalized``: query patches vs the patches of the query's own normal version, tolerant to
  small misalignment (min over a (2r+1)^2 neighbourhood).
- ``text``: WinCLIP-style: softmax over the similarities to the normal / anomalous prompt
  ensembles, only when the encoder has a text tower.

Each map and global score is standardized with constants measured on good images (the shots,
``o2n_edge.reference``), so the fusion weights mean the same thing for every category; the pool
map can be standardized ring by ring from the grid's edge (``border_fraction``), because border
patches of good images sit farther from the bank than inner ones. The fused map is upsampled to
the image size and smoothed; the image score is its top-k mean plus the weighted fused global
score (plus the global feature-statistics term when ``stats_weight`` > 0). Every constant is in
:class:`ScoringConfig` and :class:`Reference`, which the export writes into the bundle: offline
evaluation and the line-side device score with the same code, so nothing can drift apart.

Two choices are about speed on a line-side CPU, not maths:

- the nearest-neighbour search finds the neighbour with one float32 matrix product (numpy, or
  the pipeline's ONNX Runtime session: ``runtime.bank_search``) and then recomputes that
  neighbour's distance exactly in float64, so the score does not depend on which search ran;
- upsampling (bilinear, align_corners=False) and gaussian smoothing (reflect padding) are both
  linear and separable, so they are folded into one (S, h) matrix ``A`` and applied as
  ``A @ map @ A.T``.

No torch here: this module runs on the device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from o2n_edge.runtime.bank_search import Int8BankSearch, NearestSearch, NumpyBankSearch, ProjectedSearch
from o2n_edge.runtime.map_ops import (  # noqa: F401  (re-exported: the scoring's public names)
    bilinear_matrix,
    gaussian_kernel1d,
    gaussian_matrix,
    ring_constants,
    ring_index,
    topk_mean,
    upsample_and_smooth,
    upsample_smooth_matrix,
)

if TYPE_CHECKING:
    from o2n_edge.profiles import Profile

# query rows per GEMM chunk: bounds the (chunk x bank) distance matrix; 256 keeps it near the
# CPU's cache (1024 made the ORT search 1.4x slower on a 7.5k-row bank)
KNN_CHUNK = 256
TEXT_LOGIT_SCALE = 100.0  # CLIP's logit scale, as WinCLIP uses it
BRANCHES = ("personalized", "pool", "text")
DEFAULT_NORM = (0.0, 1.0)

SEARCH_PRECISIONS = ("float32", "int8")
RingNorm = tuple[tuple[float, float], ...]  # (center, scale) per border ring, the interior last


@dataclass(frozen=True)
class ScoringConfig:
    """How maps are fused into an image score; all of it is written into the bundle's manifest."""

    branches: tuple[str, ...]
    weights: dict[str, float]
    image_size: int
    topk_fraction: float = 0.01
    global_weight: float = 0.5
    smoothing_sigma: float = 4.0
    neighborhood: int = 1  # personalized branch: tolerance radius in patches
    # Global statistics branch (whole-image defects): weight of the standardized distance of the
    # query's patch-feature statistics (per-channel mean and std) to the shots'; 0 = off.
    stats_weight: float = 0.0
    # Pool map standardized per ring of grid cells counted from the edge: the outer
    # round(border_fraction * grid side) rings each get their own (center, scale), the interior
    # shares one; 0 = one constant for the whole map.
    border_fraction: float = 0.0
    # Nearest-row search in the bank's first ``search_dims`` principal axes (0 = every dimension);
    # the distance to the chosen row is exact either way (bank_search.ProjectedSearch).
    search_dims: int = 0
    # Statistics branch from one shot: its scale is at least half the distance between the
    # statistics of the shot's own quadrants (o2n_edge.reference.region_spread).
    stats_region_floor: bool = False
    # "float32": the exact nearest row; "int8": the row chosen in int8 on the CPU
    # (bank_search.Int8BankSearch), its distance still exact. A GPU always searches in float32.
    search_precision: str = "float32"

    def __post_init__(self) -> None:
        assert self.branches, "at least one branch is needed"
        if self.search_precision not in SEARCH_PRECISIONS:
            raise ValueError(f"search_precision must be one of {', '.join(SEARCH_PRECISIONS)}, "
                             f"got {self.search_precision!r}")
        for b in self.branches:
            assert b in BRANCHES, f"unknown branch {b}"
            assert self.weights.get(b, 0.0) > 0, f"branch {b} needs a positive weight"

    @classmethod
    def from_profile(cls, profile: "Profile", branches: tuple[str, ...]) -> "ScoringConfig":
        """The profile's defaults restricted to the chosen branches."""
        return cls(
            branches=tuple(branches),
            weights={b: profile.weights[b] for b in branches},
            image_size=profile.encoder.input_size,
            topk_fraction=profile.topk_fraction,
            global_weight=profile.global_weight,
            smoothing_sigma=profile.smoothing_sigma,
            stats_weight=profile.stats_weight,
            border_fraction=profile.border_fraction,
            search_dims=profile.search_dims,
            stats_region_floor=profile.stats_region_floor,
            search_precision=profile.search_precision,
        )

    @classmethod
    def from_manifest(cls, scoring: dict[str, Any]) -> "ScoringConfig":
        """From the manifest's ``scoring`` section; bundles older than a field get its off value."""
        return cls(
            branches=tuple(scoring["branches"]),
            weights={k: float(v) for k, v in scoring["weights"].items()},
            image_size=int(scoring["image_size"]),
            topk_fraction=float(scoring["topk_fraction"]),
            global_weight=float(scoring["global_weight"]),
            smoothing_sigma=float(scoring["smoothing_sigma"]),
            neighborhood=int(scoring["neighborhood"]),
            stats_weight=float(scoring.get("stats_weight", 0.0)),
            border_fraction=float(scoring.get("border_fraction", 0.0)),
            search_dims=int(scoring.get("search_dims", 0)),
            stats_region_floor=bool(scoring.get("stats_region_floor", False)),
            search_precision=str(scoring.get("search_precision", "float32")),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the bundle manifest."""
        return {
            "branches": list(self.branches),
            "weights": dict(self.weights),
            "image_size": self.image_size,
            "topk_fraction": self.topk_fraction,
            "global_weight": self.global_weight,
            "smoothing_sigma": self.smoothing_sigma,
            "neighborhood": self.neighborhood,
            "stats_weight": self.stats_weight,
            "border_fraction": self.border_fraction,
            "search_dims": self.search_dims,
            "stats_region_floor": self.stats_region_floor,
            "search_precision": self.search_precision,
        }


@dataclass
class Reference:
    """What the good images contribute: memory banks, text features, standardization constants."""

    memory_bank: np.ndarray | None  # (M, D) patch features of shots (+ pool)
    global_bank: np.ndarray | None  # (S, G) global features of shots (+ pool)
    text_features: np.ndarray | None = None  # (2, G): normal, anomalous; L2-normalized
    norm: dict[str, tuple[float, float]] = field(default_factory=dict)  # key -> (center, scale)
    stats_bank: np.ndarray | None = None  # (S, 2D) patch-feature statistics of the shots' views
    stats_scale: np.ndarray | None = None  # (2D,) per-dimension scale of those statistics
    # branch -> (center, scale) per border ring (ScoringConfig.border_fraction), the interior last
    ring_norm: dict[str, RingNorm] = field(default_factory=dict)

    def norm_of(self, key: str) -> tuple[float, float]:
        return self.norm.get(key, DEFAULT_NORM)

    @classmethod
    def from_manifest(cls, scoring: dict[str, Any], memory_bank: np.ndarray | None = None,
                      global_bank: np.ndarray | None = None, text_features: np.ndarray | None = None,
                      stats_bank: np.ndarray | None = None, stats_scale: np.ndarray | None = None) -> "Reference":
        """A bundle's reference: its arrays plus the constants of the manifest's ``scoring`` section."""
        return cls(
            memory_bank=memory_bank, global_bank=global_bank, text_features=text_features,
            norm={k: (float(v[0]), float(v[1])) for k, v in scoring.get("norm", {}).items()},
            stats_bank=stats_bank, stats_scale=stats_scale,
            ring_norm={k: tuple((float(c), float(sc)) for c, sc in v) for k, v in scoring.get("ring_norm", {}).items()},
        )


def scoring_manifest(config: ScoringConfig, reference: Reference) -> dict[str, Any]:
    """The manifest's ``scoring`` section: the config and every standardization constant."""
    return {**config.to_dict(), "norm": {k: list(v) for k, v in reference.norm.items()},
            "ring_norm": {k: [list(cs) for cs in v] for k, v in reference.ring_norm.items()}}


@dataclass
class ScoreResult:
    """Scores of a batch: image scores, fused maps at image size, and each branch's raw outputs."""

    scores: np.ndarray  # (B,) float64
    maps: np.ndarray  # (B, S, S) float32: fused, standardized, upsampled and smoothed
    branch_maps: dict[str, np.ndarray]  # branch -> (B, h, w) raw, before standardization
    global_scores: dict[str, np.ndarray]  # branch -> (B,) raw
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
    """(B,G) x (S,G) -> (B,): 1 - the best cosine similarity."""
    return 1.0 - (_normalize(g) @ _normalize(bank).T).max(axis=1)


def cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(B,G) x (B,G) -> (B,): 1 - cosine similarity, row by row."""
    return 1.0 - np.einsum("bg,bg->b", _normalize(a), _normalize(b))


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


def bank_search_for(config: ScoringConfig, bank: np.ndarray,
                    make_search: Callable[[np.ndarray], NearestSearch], threads: int = 0) -> NearestSearch:
    """The search ``config`` asks for over ``bank``: ``make_search``'s, in principal axes if set.

    ``search_precision="int8"`` replaces ``make_search`` with the CPU int8 search (a GPU pipeline
    passes a float32 config instead: its search is exact and on the device), on ``threads``
    onnxruntime threads (0: its default).
    """
    if config.search_precision == "int8":
        make_search = functools.partial(Int8BankSearch, threads=threads)
    if 0 < config.search_dims < bank.shape[1]:
        return ProjectedSearch(bank, config.search_dims, make_search)
    return make_search(bank)


class Scorer:
    """Scores encoded queries against one reference; builds the bank search once, not per batch."""

    def __init__(self, config: ScoringConfig, reference: Reference, search: NearestSearch | None = None) -> None:
        """``search``: the bank search to use (e.g. ``OrtBankSearch``); numpy's when None."""
        self.config = config
        self.reference = reference
        if config.stats_weight > 0:
            assert reference.stats_bank is not None and reference.stats_scale is not None, \
                "the global statistics branch needs the shots' statistics (build_reference with stats)"
        self.search: NearestSearch | None = None
        if "pool" in config.branches:
            assert reference.memory_bank is not None and reference.global_bank is not None, \
                "pool branch needs the memory bank"
            self.search = search or bank_search_for(config, reference.memory_bank, NumpyBankSearch)
        if "text" in config.branches:
            assert reference.text_features is not None, "text branch needs text features"

    def branch_outputs(
        self, feats: dict[str, np.ndarray], normal_feats: dict[str, np.ndarray] | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Raw (unstandardized) grid maps and global scores of every active branch."""
        c, ref = self.config, self.reference
        maps: dict[str, np.ndarray] = {}
        globals_: dict[str, np.ndarray] = {}
        if "pool" in c.branches:
            maps["pool"] = pool_map(feats["patch"], ref.memory_bank, self.search)
            globals_["pool"] = cosine_distance_to_bank(feats["global"], ref.global_bank)
        if "personalized" in c.branches:
            if normal_feats is None:
                raise ValueError("the personalized branch needs the normal versions' features")
            maps["personalized"] = personalized_map(feats["patch"], normal_feats["patch"], c.neighborhood)
            globals_["personalized"] = cosine_distance(feats["global"], normal_feats["global"])
        if "text" in c.branches:
            if "patch_text" not in feats:
                raise ValueError("the text branch needs an encoder with a text tower")
            maps["text"] = text_probability(feats["patch_text"], ref.text_features)
            globals_["text"] = text_probability(feats["global"], ref.text_features)
        return maps, globals_

    def fuse(self, maps: dict[str, np.ndarray], globals_: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Standardize and weight-average the branches: (B,h,w) fused grid map and (B,) fused global."""
        c, ref = self.config, self.reference
        total = sum(c.weights[b] for b in c.branches)
        fused_map: np.ndarray | float = 0.0
        fused_global: np.ndarray | float = 0.0
        for b in c.branches:
            center, scale = ref.norm_of(b)
            if b in ref.ring_norm:  # per border ring (ScoringConfig.border_fraction)
                center, scale = ring_constants(tuple(map(tuple, ref.ring_norm[b])), *maps[b].shape[-2:])
            gc, gs = ref.norm_of(f"global_{b}")
            w = c.weights[b] / total
            fused_map = fused_map + w * (maps[b] - center) / scale
            fused_global = fused_global + w * (globals_[b] - gc) / gs
        return np.asarray(fused_map), np.asarray(fused_global)

    def stats(self, feats: dict[str, np.ndarray]) -> np.ndarray:
        """(B,) raw distance of the queries' feature statistics to the shots' (the global branch)."""
        ref = self.reference
        return stats_distance(feature_stats(feats["patch"]), ref.stats_bank, ref.stats_scale)

    def score(self, feats: dict[str, np.ndarray], normal_feats: dict[str, np.ndarray] | None = None) -> ScoreResult:
        """Fused image scores and maps of a batch of encoded queries."""
        maps, globals_ = self.branch_outputs(feats, normal_feats)
        return self.score_maps(maps, globals_, feats)

    def score_maps(self, maps: dict[str, np.ndarray], globals_: dict[str, np.ndarray],
                   feats: dict[str, np.ndarray]) -> ScoreResult:
        """The image scores and maps from already computed branch outputs.

        Split from :meth:`score` so a study can search the bank once and compare scoring settings
        (another Scorer on the same reference) on identical nearest-neighbour maps.
        """
        c = self.config
        fused_map, fused_global = self.fuse(maps, globals_)
        full = upsample_and_smooth(fused_map, c.image_size, c.smoothing_sigma)
        scores = topk_mean(full, c.topk_fraction) + c.global_weight * fused_global
        stats = None
        if c.stats_weight > 0:
            stats = self.stats(feats)
            center, scale = self.reference.norm_of("global_stats")
            scores = scores + c.stats_weight * (stats - center) / scale
        return ScoreResult(scores=np.asarray(scores, dtype=np.float64), maps=full.astype(np.float32),
                           branch_maps=maps, global_scores=globals_, stats=stats)


def score(feats: dict[str, np.ndarray], reference: Reference, config: ScoringConfig,
          normal_feats: dict[str, np.ndarray] | None = None) -> ScoreResult:
    """Score one batch (a :class:`Scorer` for one call; build one to score many batches)."""
    return Scorer(config, reference).score(feats, normal_feats)
