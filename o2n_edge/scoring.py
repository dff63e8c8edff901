"""Reference triplet contrastive scoring in torch (the runtime's numpy port must match it).

Three branches each give a patch-level map and a global score:

- ``pool``: query patches vs a memory bank of the shots' patch features (plus, after
  personalization, those of generated anomaly-free images); nearest-neighbour L2 distance.
- ``personalized``: query patches vs the patches of the query's own normal version, tolerant to
  small misalignment (min over a (2r+1)^2 neighbourhood).
- ``text``: WinCLIP-style: softmax over the similarities to the normal / anomalous prompt
  ensembles, only when the encoder has a text tower.

Each map and global score is standardized with constants measured on good reference images
(the shots), so the fusion weights mean the same thing for every category. The pool map can be
standardized ring by ring from the grid's edge (``border_fraction``): a border patch of a good image
sits farther from the memory bank than an inner one (the convolutions see padding there, and the
bank holds few border patches to match it), so with one constant the image score of every image
is set by its border and a small defect inside never wins the top-k (measured on the textile set's
small local defects: ``benchmarks/results/scoring_sweep_issue11.md``). The fused map is
upsampled to the image size and smoothed, and the image score is its top-k mean plus the
weighted fused global score. Every constant lives in :class:`Reference`, which the export
writes into the bundle: nothing stays behind in Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from o2n_edge.branch_maps import (  # noqa: F401  (re-exported: the scoring API's names)
    KNN_CHUNK,
    TEXT_LOGIT_SCALE,
    _t,
    cosine_distance_to_bank,
    feature_stats,
    knn_distance,
    personalized_map,
    pool_map,
    stats_distance,
    stats_scale,
    text_probability,
)
from o2n_edge.profiles import BRANCHES, Profile

NORM_EPS = 1e-3  # absolute floor of a branch's standardization scale
# Relative floor: with 1-4 shots a global score has 1-4 reference values, whose spread says
# nothing; without this floor a near-zero spread turns the global term into the whole score.
NORM_REL_FLOOR = 0.1
DEFAULT_NORM = (0.0, 1.0)


@dataclass(frozen=True)
class ScoringConfig:
    """How maps are fused into an image score; all of it is exported into the bundle."""

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

    def __post_init__(self) -> None:
        assert self.branches, "at least one branch is needed"
        for b in self.branches:
            assert b in BRANCHES, f"unknown branch {b}"
            assert self.weights.get(b, 0.0) > 0, f"branch {b} needs a positive weight"

    @classmethod
    def from_profile(cls, profile: Profile, branches: tuple[str, ...]) -> "ScoringConfig":
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
        )

    def to_dict(self) -> dict:
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
        }


@dataclass
class Reference:
    """What the good images contribute: memory banks, text features, standardization constants."""

    memory_bank: np.ndarray  # (M, D) patch features of shots (+ pool)
    global_bank: np.ndarray  # (S, G) global features of shots (+ pool)
    text_features: np.ndarray | None = None  # (2, G): normal, anomalous; L2-normalized
    norm: dict[str, tuple[float, float]] = field(default_factory=dict)  # key -> (center, scale)
    stats_bank: np.ndarray | None = None  # (S, 2D) patch-feature statistics of the shots' views
    stats_scale: np.ndarray | None = None  # (2D,) per-dimension scale of those statistics
    # branch -> [(center, scale)] per border ring (ScoringConfig.border_fraction), the interior last
    ring_norm: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def norm_of(self, key: str) -> tuple[float, float]:
        return self.norm.get(key, DEFAULT_NORM)


def scoring_manifest(config: ScoringConfig, reference: Reference) -> dict:
    """The manifest's ``scoring`` section: the config and every standardization constant."""
    return {**config.to_dict(), "norm": {k: list(v) for k, v in reference.norm.items()},
            "ring_norm": {k: [list(cs) for cs in v] for k, v in reference.ring_norm.items()}}


def ring_index(h: int, w: int, rings: int) -> np.ndarray:
    """(h,w) int: each grid cell's distance to the nearest edge, capped at ``rings`` (the interior)."""
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.minimum(np.minimum(np.minimum(i, j), np.minimum(h - 1 - i, w - 1 - j)), rings)


def ring_constants(ring_norm: list[tuple[float, float]], h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(center, scale) maps (h,w) from per-ring constants (see :func:`ring_index`)."""
    table = np.asarray(ring_norm, dtype=np.float64)
    idx = ring_index(h, w, len(table) - 1)
    return table[idx, 0], table[idx, 1]


@dataclass
class ScoreResult:
    """Scores of a batch: image scores, fused maps at image size, and each branch's raw grid map."""

    scores: np.ndarray  # (B,)
    maps: np.ndarray  # (B, S, S) fused, standardized, upsampled and smoothed
    branch_maps: dict[str, np.ndarray]  # branch -> (B, h, w) raw, before standardization
    global_scores: dict[str, np.ndarray]  # branch -> (B,) raw
    stats: np.ndarray | None = None  # (B,) raw global-statistics distance (when the branch is on)


# ----------------------------------------------------------------------------- maps -> scores


def gaussian_kernel1d(sigma: float) -> np.ndarray:
    """Normalized 1-D gaussian with scipy's default truncation (4 sigma)."""
    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def upsample_and_smooth(grid_map: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """(B,h,w) -> (B,size,size): bilinear (align_corners=False), then separable gaussian (reflect)."""
    x = F.interpolate(grid_map[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)
    if sigma > 0:
        k = torch.from_numpy(gaussian_kernel1d(sigma))
        r = (k.numel() - 1) // 2
        x = F.pad(x, (r, r, 0, 0), mode="reflect")
        x = F.conv2d(x, k.view(1, 1, 1, -1))
        x = F.pad(x, (0, 0, r, r), mode="reflect")
        x = F.conv2d(x, k.view(1, 1, -1, 1))
    return x[:, 0]


def topk_mean(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """(B,S,S) -> (B,): mean of the top `fraction` of pixels (at least one)."""
    flat = maps.reshape(maps.shape[0], -1)
    k = max(1, int(round(fraction * flat.shape[1])))
    return flat.topk(k, dim=1).values.mean(dim=1)


# ----------------------------------------------------------------------------- public API


def branch_outputs(
    feats: dict[str, np.ndarray],
    reference: Reference,
    config: ScoringConfig,
    normal_feats: dict[str, np.ndarray] | None = None,
    exclude_bank_rows: slice | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Raw (unstandardized) grid maps and global scores of every active branch."""
    maps: dict[str, torch.Tensor] = {}
    globals_: dict[str, torch.Tensor] = {}
    patch = _t(feats["patch"]).float()
    glob = _t(feats["global"]).float()
    if "pool" in config.branches:
        bank = _t(reference.memory_bank).float()
        gbank = _t(reference.global_bank).float()
        maps["pool"] = pool_map(patch, bank)
        globals_["pool"] = cosine_distance_to_bank(glob, gbank)
    if "personalized" in config.branches:
        if normal_feats is None:
            raise ValueError("the personalized branch needs the normal versions' features")
        maps["personalized"] = personalized_map(patch, _t(normal_feats["patch"]).float(), config.neighborhood)
        ng = _t(normal_feats["global"]).float()
        globals_["personalized"] = 1.0 - F.cosine_similarity(glob.double(), ng.double(), dim=-1).float()
    if "text" in config.branches:
        if reference.text_features is None or "patch_text" not in feats:
            raise ValueError("the text branch needs an encoder with a text tower")
        tf = _t(reference.text_features).float()
        maps["text"] = text_probability(_t(feats["patch_text"]).float(), tf)
        globals_["text"] = text_probability(glob, tf)
    return maps, globals_


def fuse(
    maps: dict[str, torch.Tensor], globals_: dict[str, torch.Tensor], reference: Reference, config: ScoringConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardize and weight-average the branches: (B,h,w) fused grid map and (B,) fused global."""
    total = sum(config.weights[b] for b in config.branches)
    fused_map = 0.0
    fused_global = 0.0
    for b in config.branches:
        c, s = reference.norm_of(b)
        if b in reference.ring_norm:
            rc, rs = ring_constants(reference.ring_norm[b], *maps[b].shape[-2:])
            standardized = ((maps[b].double() - torch.from_numpy(rc)) / torch.from_numpy(rs)).float()
        else:
            standardized = (maps[b] - c) / s
        gc, gs = reference.norm_of(f"global_{b}")
        w = config.weights[b] / total
        fused_map = fused_map + w * standardized
        fused_global = fused_global + w * (globals_[b] - gc) / gs
    return fused_map, fused_global  # type: ignore[return-value]


def score(
    feats: dict[str, np.ndarray],
    reference: Reference,
    config: ScoringConfig,
    normal_feats: dict[str, np.ndarray] | None = None,
) -> ScoreResult:
    """Score a batch of encoded queries (encoder outputs as numpy arrays)."""
    with torch.inference_mode():
        maps, globals_ = branch_outputs(feats, reference, config, normal_feats)
        fused_map, fused_global = fuse(maps, globals_, reference, config)
        full = upsample_and_smooth(fused_map, config.image_size, config.smoothing_sigma)
        image = topk_mean(full, config.topk_fraction) + config.global_weight * fused_global
        stats = None
        if config.stats_weight > 0:
            stats = stats_branch(feats, reference)
            c, s = reference.norm_of("global_stats")
            image = image + config.stats_weight * (stats - c) / s
    return ScoreResult(
        scores=image.numpy().astype(np.float64),
        maps=full.numpy(),
        branch_maps={k: v.numpy() for k, v in maps.items()},
        global_scores={k: v.numpy() for k, v in globals_.items()},
        stats=None if stats is None else stats.numpy(),
    )


def stats_branch(feats: dict[str, np.ndarray], reference: Reference) -> torch.Tensor:
    """(B,) raw distance of the queries' feature statistics to the shots' (the global branch)."""
    if reference.stats_bank is None or reference.stats_scale is None:
        raise ValueError("the global statistics branch needs the shots' statistics (build_reference with stats)")
    return stats_distance(feature_stats(_t(feats["patch"])), _t(reference.stats_bank), _t(reference.stats_scale))


def _standardization(values: list[torch.Tensor]) -> tuple[float, float]:
    """(center, scale) of good images' values; the scale is floored at 10% of the center."""
    v = torch.cat([x.reshape(-1).double() for x in values])
    center = float(v.mean())
    return center, float(max(float(v.std(unbiased=False)), NORM_REL_FLOOR * abs(center), NORM_EPS))


def border_ring_count(h: int, w: int, fraction: float) -> int:
    """How many rings from the edge get their own constants: ``fraction`` of the grid side, at least 1."""
    return max(1, round(fraction * min(h, w)))


def _ring_standardization(maps: list[torch.Tensor], fraction: float,
                          whole: tuple[float, float]) -> list[tuple[float, float]]:
    """Per border ring (center, scale) of good images' grid maps.

    Each ring's scale is floored at the whole map's (``whole``): a ring of plain background that
    varies little between the shots would otherwise magnify any change there (measured: tire at
    2 shots, pixel AUROC 96 -> 64 with the heat map lit along the background rings). The center
    is the ring's own: that is what removes the border's excess distance. An empty ring takes
    ``whole``.
    """
    h, w = maps[0].shape[-2:]
    rings = border_ring_count(h, w, fraction)
    idx = torch.from_numpy(ring_index(h, w, rings))
    out = []
    for r in range(rings + 1):
        sel = [m.reshape(-1, h, w)[:, idx == r] for m in maps]
        if not sel[0].numel():
            out.append(whole)
            continue
        center, scale = _standardization(sel)
        out.append((center, max(scale, whole[1])))
    return out


def build_reference(
    shot_feats: list[dict[str, np.ndarray]],
    config: ScoringConfig,
    text_features: np.ndarray | None = None,
    pool_feats: dict[str, np.ndarray] | None = None,
    shot_normal_feats: dict[str, np.ndarray] | None = None,
) -> Reference:
    """Memory banks and standardization constants from the shots.

    ``shot_feats[i]`` holds the encoder outputs of shot i's augmented views, the un-augmented
    view first. The standardization of the pool branch is measured leave-one-shot-out (each
    shot's original view against the other shots' views; with a single shot, against its own
    augmented views), so the constants describe the distance of an unseen good image, not zero.
    """
    assert shot_feats, "at least one shot is needed"
    bank = np.concatenate([f["patch"].reshape(-1, f["patch"].shape[-1]) for f in shot_feats])
    gbank = np.concatenate([f["global"] for f in shot_feats])
    if pool_feats is not None:
        bank = np.concatenate([bank, pool_feats["patch"].reshape(-1, bank.shape[1])])
        gbank = np.concatenate([gbank, pool_feats["global"]])
    ref = Reference(memory_bank=bank.astype(np.float32), global_bank=gbank.astype(np.float32),
                    text_features=None if text_features is None else text_features.astype(np.float32))
    originals = {k: np.stack([f[k][0] for f in shot_feats]) for k in shot_feats[0]}
    with torch.inference_mode():
        if config.stats_weight > 0:
            _stats_reference(ref, shot_feats, pool_feats)
        if "pool" in config.branches:
            loo_maps, loo_globals = [], []
            for i, f in enumerate(shot_feats):
                if len(shot_feats) > 1:
                    others = [g for j, g in enumerate(shot_feats) if j != i]
                else:
                    others = [{k: v[1:] for k, v in f.items()}]
                    assert others[0]["patch"].shape[0] > 0, "one shot needs augmented views for its constants"
                if pool_feats is not None:
                    others = others + [pool_feats]
                obank = torch.from_numpy(np.concatenate([g["patch"].reshape(-1, bank.shape[1]) for g in others]))
                ogbank = torch.from_numpy(np.concatenate([g["global"] for g in others]))
                loo_maps.append(pool_map(_t(f["patch"][:1]).float(), obank.float()))
                loo_globals.append(cosine_distance_to_bank(_t(f["global"][:1]).float(), ogbank.float()))
            ref.norm["pool"] = _standardization(loo_maps)
            if config.border_fraction > 0:
                ref.ring_norm["pool"] = _ring_standardization(loo_maps, config.border_fraction, ref.norm["pool"])
            ref.norm["global_pool"] = _standardization(loo_globals)
        if "text" in config.branches:
            if ref.text_features is None or "patch_text" not in originals:
                raise ValueError("the text branch needs text features and an encoder with a text tower")
            tf = _t(ref.text_features)
            ref.norm["text"] = _standardization([text_probability(_t(originals["patch_text"]), tf)])
            ref.norm["global_text"] = _standardization([text_probability(_t(originals["global"]), tf)])
        if "personalized" in config.branches:
            if shot_normal_feats is None:
                raise ValueError("the personalized branch needs the shots' normal versions")
            pm = personalized_map(_t(originals["patch"]), _t(shot_normal_feats["patch"]), config.neighborhood)
            pg = 1.0 - F.cosine_similarity(_t(originals["global"]).double(), _t(shot_normal_feats["global"]).double(), dim=-1)
            ref.norm["personalized"] = _standardization([pm])
            ref.norm["global_personalized"] = _standardization([pg.float()])
    return ref


def _stats_reference(ref: Reference, shot_feats: list[dict[str, np.ndarray]],
                     pool_feats: dict[str, np.ndarray] | None) -> None:
    """Statistics bank, scales and leave-one-shot-out standardization of the global branch."""
    per_shot = [feature_stats(_t(f["patch"])) for f in shot_feats]
    extra = [feature_stats(_t(pool_feats["patch"]))] if pool_feats is not None else []
    bank = torch.cat(per_shot + extra)
    scale = stats_scale(bank)
    ref.stats_bank = bank.numpy().astype(np.float32)
    ref.stats_scale = scale.numpy().astype(np.float32)
    loo = []
    for i, st in enumerate(per_shot):
        others = [g for j, g in enumerate(per_shot) if j != i] if len(per_shot) > 1 else [st[1:]]
        assert others[0].shape[0] > 0, "one shot needs augmented views for its constants"
        loo.append(stats_distance(st[:1], torch.cat(others + extra), scale))
    ref.norm["global_stats"] = _standardization(loo)


def augment_views(image: np.ndarray) -> list[np.ndarray]:
    """The original view first, then flips and right-angle rotations.

    Parts on a line appear flipped and rotated; the memory bank should not call that an anomaly.
    """
    views = [image, image[:, ::-1], image[::-1, :], np.rot90(image, 1), np.rot90(image, 2), np.rot90(image, 3)]
    return [np.ascontiguousarray(v) for v in views]
