"""The maths of ``o2n-edge learn``: vetted images -> a bigger memory bank, its constants, a new threshold.

Why it runs on the line device, without torch: the images and the verdicts are there. The
features come from the bundle's own ONNX image encoder through :class:`OrtPipeline` (the export's
encoder, exported), with the same augmented views the export gave each shot
(:func:`o2n_edge.reference.augment_views`, flips and right-angle rotations, plain numpy).

What changes, and why only that: the pool branch's memory bank and global bank, the statistics
bank, and every standardization constant measured against them (the pool map's, its border
rings', the global pool and statistics terms). The added images are measured as the export
measures the shots, leave-one-out: each one's original view against the parent's bank plus the
other added images. The personalized and text branches do not read the bank, so their constants
stay the parent's; each branch is standardized on its own before fusion, so the fused score keeps
its meaning.

How the constants are set (``constants``): a learn run adds 1-3 images, and constants measured on
those alone replaced constants measured on 4+ images -- a scalar center/scale from one or two
values (measured: tire AUROC 80 -> 69 after 3 added images). ``"pooled"`` (the default) pools
each (center, scale) with the parent's, weighted by how many images each was measured on (the
parent's: its shots plus every image its lineage added): center = weighted mean, scale =
sqrt(weighted mean of scale^2 + (center_i - center)^2), the pooled std of the two groups. One
image added to a 4-shot parent moves a constant by at most 1/5 of the difference. The statistics
branch keeps the parent's per-dimension scale so that the pooled distances are in one unit.
``"keep"`` leaves every constant the parent's; ``"remeasure"`` is the old replacement (studies only).

The coreset: each added image's rows are reduced at the parent's coreset ratio (greedy
k-center, as the export reduced the shots'), appended to the parent's bank, and the whole is
reduced again only past the row budget (``max_rows``). The constants are measured against these
reduced rows, the bank the runtime will search.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from o2n_edge.data.preprocess import resize_uint8
from o2n_edge.reference import augment_views, ring_standardization, standardization, stats_scale
from o2n_edge.runtime.coreset import greedy_coreset
from o2n_edge.runtime.pipeline import OrtPipeline
from o2n_edge.runtime.scoring import (
    Reference,
    Scorer,
    ScoringConfig,
    cosine_distance_to_bank,
    feature_stats,
    pool_map,
    stats_distance,
)

Features = dict[str, np.ndarray]
MAX_BANK_ROWS = 50_000  # upper bound for bundles that do not record their row budget (the non-lite profiles' cap)
MAX_STANDARDIZATION_IMAGES = 32  # leave-one-out constants measured on at most this many added images
CONSTANT_RULES = ("pooled", "keep", "remeasure")
Norm = tuple[float, float]


def encode_views(pipe: OrtPipeline, images: Sequence[np.ndarray]) -> list[Features]:
    """Each image at the bundle's size -> its augmented views' encoder outputs (the original first)."""
    out = []
    for im in images:
        views = augment_views(resize_uint8([im], pipe.image_size)[0])
        out.append(pipe.encode(np.stack(views)))
    return out


def pool_norm(parent: Norm, new: Norm, parent_weight: float, new_weight: float) -> Norm:
    """Count-weighted pooled (center, scale) of two groups: their union's mean and std, as if measured together."""
    w = np.array([parent_weight, new_weight], dtype=np.float64)
    w = w / w.sum()
    c = np.array([parent[0], new[0]], dtype=np.float64)
    sc = np.array([parent[1], new[1]], dtype=np.float64)
    center = float(w @ c)
    return center, float(np.sqrt(w @ (sc ** 2 + (c - center) ** 2)))


def extend_reference(parent: Reference, config: ScoringConfig, added: list[Features], *, ratio: float,
                     max_rows: int, seed: int = 0, constants: str = "pooled",
                     parent_images: int = 1) -> tuple[Reference, dict[str, Any]]:
    """The parent's reference with ``added`` images in its banks, its bank-dependent constants set by ``constants``.

    ``parent_images``: how many images the parent's constants were measured on (its pooling weight).
    Returns the new reference and the manifest's ``memory_bank.coreset`` record (``constants``: the rule
    and the weights, for the lineage).
    """
    if constants not in CONSTANT_RULES:
        raise ValueError(f"constants must be one of {', '.join(CONSTANT_RULES)}, not {constants!r}")
    if parent.memory_bank is None or parent.global_bank is None:
        raise ValueError("the bundle has no memory bank: only a bundle with the pool branch can learn")
    if not added:
        raise ValueError("nothing to add")
    dim = parent.memory_bank.shape[1]
    rows = [f["patch"].reshape(-1, dim).astype(np.float32) for f in added]
    reduced = [r[greedy_coreset(r, ratio, seed=seed)] if ratio < 1.0 else r for r in rows]
    ref = replace(parent, norm=dict(parent.norm), ring_norm=dict(parent.ring_norm))
    ref.global_bank = np.concatenate([parent.global_bank, *[f["global"] for f in added]]).astype(np.float32)
    which = np.random.default_rng(seed).permutation(len(added))[:MAX_STANDARDIZATION_IMAGES]
    if "pool" in config.branches:
        _pool_constants(ref, parent, config, added, reduced, which)
    if config.stats_weight > 0:
        _stats_constants(ref, parent, added, which, keep_scale=constants != "remeasure")
    crec: dict[str, Any] = {"rule": constants, "parent_images": int(parent_images), "added_images": int(len(which))}
    if constants != "remeasure":
        _settle(ref, parent, config, constants, float(max(parent_images, 1)), float(len(which)))
    bank = np.concatenate([parent.memory_bank, *reduced]).astype(np.float32)
    represented = int(sum(r.shape[0] for r in rows))
    info: dict[str, Any] = {"ratio": float(ratio), "rows_parent": int(parent.memory_bank.shape[0]),
                            "rows_added": represented, "rows_before": int(bank.shape[0]), "max_rows": int(max_rows)}
    if bank.shape[0] > max_rows:
        idx = greedy_coreset(bank, max_rows / bank.shape[0], seed=seed, max_rows=max_rows)
        bank = bank[idx]
    ref.memory_bank = bank
    info["rows_after"] = int(bank.shape[0])
    info["method"] = "per added image greedy k-center at the parent's ratio; whole bank again above max_rows"
    info["constants"] = crec
    return ref, info


def _settle(ref: Reference, parent: Reference, config: ScoringConfig, rule: str, w_parent: float,
            w_new: float) -> None:
    """Replace the freshly measured bank-dependent constants by the parent's (keep) or the pooled pair (pooled)."""
    keys = [k for k in ("pool", "global_pool", "global_stats") if k in ref.norm and k in parent.norm]
    for k in keys:
        ref.norm[k] = parent.norm[k] if rule == "keep" else pool_norm(parent.norm[k], ref.norm[k], w_parent, w_new)
    if "pool" in ref.ring_norm and "pool" in parent.ring_norm and len(ref.ring_norm["pool"]) == len(parent.ring_norm["pool"]):
        if rule == "keep":
            ref.ring_norm["pool"] = parent.ring_norm["pool"]
        else:  # each ring pooled, its scale floored at the pooled whole map's (as ring_standardization does)
            whole = ref.norm["pool"][1]
            rings = [pool_norm(p, n, w_parent, w_new) for p, n in zip(parent.ring_norm["pool"], ref.ring_norm["pool"])]
            ref.ring_norm["pool"] = tuple((c, max(s, whole)) for c, s in rings)


def _others(parts: list[np.ndarray], i: int, base: np.ndarray) -> np.ndarray:
    return np.concatenate([base, *[p for j, p in enumerate(parts) if j != i]])


def _pool_constants(ref: Reference, parent: Reference, config: ScoringConfig, added: list[Features],
                    reduced: list[np.ndarray], which: np.ndarray) -> None:
    """Leave-one-out pool map and global constants of the added images (each against all else)."""
    assert parent.memory_bank is not None and parent.global_bank is not None
    globals_ = [f["global"] for f in added]
    maps, gl = [], []
    for i in which:
        maps.append(pool_map(added[i]["patch"][:1], _others(reduced, i, parent.memory_bank).astype(np.float32)))
        gl.append(cosine_distance_to_bank(added[i]["global"][:1], _others(globals_, i, parent.global_bank)))
    ref.norm["pool"] = standardization(maps)
    if config.border_fraction > 0:
        ref.ring_norm["pool"] = ring_standardization(maps, config.border_fraction, ref.norm["pool"])
    ref.norm["global_pool"] = standardization(gl)


def _stats_constants(ref: Reference, parent: Reference, added: list[Features], which: np.ndarray,
                     keep_scale: bool) -> None:
    """The statistics bank grows by every added view; leave-one-out constants measured (scale: see module doc)."""
    if parent.stats_bank is None:
        raise ValueError("the bundle uses the statistics branch but has no stats_bank")
    per = [feature_stats(f["patch"]) for f in added]
    bank = np.concatenate([parent.stats_bank.astype(np.float64), *per])
    if keep_scale and parent.stats_scale is not None:
        scale = np.asarray(parent.stats_scale, dtype=np.float64)
    else:
        scale = stats_scale(bank)
    ref.stats_bank, ref.stats_scale = bank.astype(np.float32), scale.astype(np.float32)
    loo = [stats_distance(per[i][:1], _others(per, i, parent.stats_bank.astype(np.float64)), scale) for i in which]
    ref.norm["global_stats"] = standardization(loo)


def score_images(pipe: OrtPipeline, config: ScoringConfig, reference: Reference,
                 images: Sequence[np.ndarray], batch: int = 8) -> np.ndarray:
    """Scores of ``images`` against ``reference``, with the pipeline's encoder (and transform, if any)."""
    scorer = Scorer(config, reference)
    out: list[float] = []
    for start in range(0, len(images), batch):
        query = resize_uint8(list(images[start:start + batch]), pipe.image_size)
        normal = pipe.encode(pipe.normal_versions(query)) if pipe.uses_transform else None
        out.extend(float(s) for s in scorer.score(pipe.encode(query), normal).scores)
    return np.asarray(out, dtype=np.float64)


def calibrate(scores: np.ndarray, quantile: float, parent_threshold: float, minimum: int,
              say: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """The new threshold: ``quantile`` of held-out good scores, or the parent's when too few (said, recorded)."""
    n = int(len(scores))
    rec: dict[str, Any] = {"parent": float(parent_threshold), "quantile": float(quantile), "n_images": n}
    if n >= minimum:
        rec.update(value=float(np.quantile(scores, quantile)), recalibrated=True)
        say(f"threshold recalibrated on {n} held-out good images: {parent_threshold:.4f} -> {rec['value']:.4f}")
    else:
        rec.update(value=float(parent_threshold), recalibrated=False,
                   reason=f"{n} held-out good images, fewer than {minimum}: the parent's threshold is kept")
        say(f"threshold NOT recalibrated ({rec['reason']})")
    return rec
