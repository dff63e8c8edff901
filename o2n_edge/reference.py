"""Building a :class:`~o2n_edge.runtime.scoring.Reference` from the shots (offline, torch-free).

Why a separate module: the runtime only reads a reference out of a bundle; measuring one (memory
banks, standardization constants, border-ring constants, the statistics bank) happens once, in
``eval`` and ``export``. The maps it measures on are the runtime's own
(:mod:`o2n_edge.runtime.scoring`), so the constants describe exactly the numbers the device will
standardize.
"""

from __future__ import annotations

import numpy as np

from o2n_edge.runtime.scoring import (
    Reference,
    RingNorm,
    ScoringConfig,
    cosine_distance,
    cosine_distance_to_bank,
    feature_stats,
    personalized_map,
    pool_map,
    ring_index,
    stats_distance,
    text_probability,
)

NORM_EPS = 1e-3  # absolute floor of a branch's standardization scale
# Relative floor: with 1-4 shots a global score has 1-4 reference values, whose spread says
# nothing; without this floor a near-zero spread turns the global term into the whole score.
NORM_REL_FLOOR = 0.1
# Global statistics branch: per-dimension scales of the shots' feature statistics are floored at
# this fraction of their median, so a dimension the few shots happen to agree on exactly does not
# turn any deviation in it into an infinite distance.
STATS_SCALE_FLOOR = 1.0

Features = dict[str, np.ndarray]


def augment_views(image: np.ndarray) -> list[np.ndarray]:
    """The original view first, then flips and right-angle rotations.

    Parts on a line appear flipped and rotated; the memory bank should not call that an anomaly.
    """
    views = [image, image[:, ::-1], image[::-1, :], np.rot90(image, 1), np.rot90(image, 2), np.rot90(image, 3)]
    return [np.ascontiguousarray(v) for v in views]


def standardization(values: list[np.ndarray]) -> tuple[float, float]:
    """(center, scale) of good images' values; the scale is floored at 10% of the center."""
    v = np.concatenate([np.asarray(x, dtype=np.float64).reshape(-1) for x in values])
    center = float(v.mean())
    return center, float(max(float(v.std()), NORM_REL_FLOOR * abs(center), NORM_EPS))


def border_ring_count(h: int, w: int, fraction: float) -> int:
    """How many rings from the edge get their own constants: ``fraction`` of the grid side, at least 1."""
    return max(1, round(fraction * min(h, w)))


def ring_standardization(maps: list[np.ndarray], fraction: float, whole: tuple[float, float]) -> RingNorm:
    """Per border ring (center, scale) of good images' grid maps.

    Each ring's scale is floored at the whole map's (``whole``): a ring of plain background that
    varies little between the shots would otherwise magnify any change there (measured: tire at
    2 shots, pixel AUROC 96 -> 64 with the heat map lit along the background rings). The center
    is the ring's own: that is what removes the border's excess distance. An empty ring takes
    ``whole``.
    """
    h, w = maps[0].shape[-2:]
    rings = border_ring_count(h, w, fraction)
    idx = ring_index(h, w, rings)
    out = []
    for r in range(rings + 1):
        sel = [m.reshape(-1, h, w)[:, idx == r] for m in maps]
        if not sel[0].size:
            out.append(whole)
            continue
        center, scale = standardization(sel)
        out.append((center, max(scale, whole[1])))
    return tuple(out)


def stats_scale(bank: np.ndarray) -> np.ndarray:
    """(S,2D) -> (2D,): per-dimension std of the shots' statistics, floored at the median's share.

    The median is the lower middle value for an even count (what the scale was first measured
    with), not numpy's mean of the two.
    """
    b = np.asarray(bank, dtype=np.float64)
    sd = b.std(axis=0) if b.shape[0] > 1 else np.zeros(b.shape[1])
    median = float(np.sort(sd)[(sd.size - 1) // 2])
    floor = max(median * STATS_SCALE_FLOOR, float(np.abs(b).mean()) * 1e-3, 1e-6)
    return np.maximum(sd, floor)


def build_reference(
    shot_feats: list[Features],
    config: ScoringConfig,
    text_features: np.ndarray | None = None,
    pool_feats: Features | None = None,
    shot_normal_feats: Features | None = None,
) -> Reference:
    """Memory banks and standardization constants from the shots.

    ``shot_feats[i]`` holds the encoder outputs of shot i's augmented views, the un-augmented
    view first. The standardization of the pool branch is measured leave-one-shot-out (each
    shot's original view against the other shots' views; with a single shot, against its own
    augmented views), so the constants describe the distance of an unseen good image, not zero.
    """
    assert shot_feats, "at least one shot is needed"
    dim = shot_feats[0]["patch"].shape[-1]
    bank = np.concatenate([f["patch"].reshape(-1, dim) for f in shot_feats])
    gbank = np.concatenate([f["global"] for f in shot_feats])
    if pool_feats is not None:
        bank = np.concatenate([bank, pool_feats["patch"].reshape(-1, dim)])
        gbank = np.concatenate([gbank, pool_feats["global"]])
    ref = Reference(memory_bank=bank.astype(np.float32), global_bank=gbank.astype(np.float32),
                    text_features=None if text_features is None else text_features.astype(np.float32))
    originals = {k: np.stack([f[k][0] for f in shot_feats]) for k in shot_feats[0]}
    if config.stats_weight > 0:
        _stats_reference(ref, shot_feats, pool_feats, config.stats_region_floor)
    if "pool" in config.branches:
        _pool_reference(ref, shot_feats, pool_feats, config.border_fraction)
    if "text" in config.branches:
        if ref.text_features is None or "patch_text" not in originals:
            raise ValueError("the text branch needs text features and an encoder with a text tower")
        ref.norm["text"] = standardization([text_probability(originals["patch_text"], ref.text_features)])
        ref.norm["global_text"] = standardization([text_probability(originals["global"], ref.text_features)])
    if "personalized" in config.branches:
        if shot_normal_feats is None:
            raise ValueError("the personalized branch needs the shots' normal versions")
        pm = personalized_map(originals["patch"], shot_normal_feats["patch"], config.neighborhood)
        ref.norm["personalized"] = standardization([pm])
        ref.norm["global_personalized"] = standardization(
            [cosine_distance(originals["global"], shot_normal_feats["global"])])
    return ref


def _pool_reference(ref: Reference, shot_feats: list[Features], pool_feats: Features | None,
                    border_fraction: float) -> None:
    """Leave-one-shot-out standardization of the pool branch (whole map, border rings, global)."""
    dim = shot_feats[0]["patch"].shape[-1]
    loo_maps, loo_globals = [], []
    for i, f in enumerate(shot_feats):
        if len(shot_feats) > 1:
            others = [g for j, g in enumerate(shot_feats) if j != i]
        else:  # one shot: its own augmented views
            others = [{k: v[1:] for k, v in f.items()}]
            assert others[0]["patch"].shape[0] > 0, "one shot needs augmented views for its constants"
        others += [pool_feats] if pool_feats is not None else []
        obank = np.concatenate([g["patch"].reshape(-1, dim) for g in others]).astype(np.float32)
        ogbank = np.concatenate([g["global"] for g in others])
        loo_maps.append(pool_map(f["patch"][:1], obank))
        loo_globals.append(cosine_distance_to_bank(f["global"][:1], ogbank))
    ref.norm["pool"] = standardization(loo_maps)
    if border_fraction > 0:
        ref.ring_norm["pool"] = ring_standardization(loo_maps, border_fraction, ref.norm["pool"])
    ref.norm["global_pool"] = standardization(loo_globals)


def region_stats(patch: np.ndarray) -> np.ndarray:
    """(h,w,D) one image's patch features -> (4,2D): the statistics of each quadrant of the grid."""
    h, w = patch.shape[0] // 2, patch.shape[1] // 2
    quads = [patch[:h, :w], patch[:h, w:], patch[h:, :w], patch[h:, w:]]
    return np.concatenate([feature_stats(q[None]) for q in quads])


def region_spread(shot_feats: list[Features], scale: np.ndarray) -> float:
    """Half the mean distance of a quadrant's statistics to the other quadrants' (every shot).

    Why: the statistics branch is standardized by how much a good part's statistics vary. With
    two or more shots that is measured between the shots (leave one out); with one shot the
    only other "images" are its flips and rotations, whose statistics barely differ, so the
    branch would call any other good part an anomaly (measured: a brightness change on
    hazelnut, tire's part-to-part variation). The shot's own regions are a second measurement:
    half their mean distance, because a whole image averages four quadrants. On a texture the
    quadrants agree and the statistics stay a sharp test; on an object they differ, and the
    branch is scaled down to what one shot can vouch for.
    """
    rows = np.concatenate([region_stats(f["patch"][0]) for f in shot_feats])
    dists = [stats_distance(rows[i:i + 1], np.delete(rows, i, axis=0), scale)[0] for i in range(len(rows))]
    return 0.5 * float(np.mean(dists))


def _stats_reference(ref: Reference, shot_feats: list[Features], pool_feats: Features | None,
                     region_floor: bool = False) -> None:
    """Statistics bank, scales and leave-one-shot-out standardization of the global branch."""
    per_shot = [feature_stats(f["patch"]) for f in shot_feats]
    extra = [feature_stats(pool_feats["patch"])] if pool_feats is not None else []
    bank = np.concatenate(per_shot + extra)
    scale = stats_scale(bank)
    ref.stats_bank = bank.astype(np.float32)
    ref.stats_scale = scale.astype(np.float32)
    loo = []
    for i, st in enumerate(per_shot):
        others = [g for j, g in enumerate(per_shot) if j != i] if len(per_shot) > 1 else [st[1:]]
        assert others[0].shape[0] > 0, "one shot needs augmented views for its constants"
        loo.append(stats_distance(st[:1], np.concatenate(others + extra), scale))
    center, spread = standardization(loo)
    if region_floor and len(per_shot) == 1:  # one shot: no other part to measure the spread on
        spread = max(spread, region_spread(shot_feats, scale))
    ref.norm["global_stats"] = (center, spread)
