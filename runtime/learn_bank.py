"""The maths of ``o2n-edge learn``: vetted images -> a bigger memory bank, its constants, a new threshold.

Why it runs on the line device, without torch: the images and the verdicts are there. The
features come from the bundle's own ONNX image encoder through :class:`OrtPipeline` (the export's
encoder, exported), with the same augmented views the export gave each shot
(:func:`o2n_edge.reference.augment_views`, flips and right-angle rotations, plain numpy).

What changes, and why only that: the pool branch's memory bank and global bank, the statistics
bank and scale, and every standardization constant measured against them (the pool map's, its
border rings', the global pool and statistics terms). They are measured as the export measures
them, leave-one-out: each added image's original view against the parent's bank plus the other
added images, so they describe an unseen good image's distance to the new bank. The personalized
and text branches do not read the bank, so their constants stay the parent's; each branch is
standardized on its own before fusion, so the fused score keeps its meaning.

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
MAX_BANK_ROWS = 50_000  # the export's bound on the memory bank (export.stages_reference.MAX_BANK_ROWS)
MAX_STANDARDIZATION_IMAGES = 32  # leave-one-out constants measured on at most this many added images


def encode_views(pipe: OrtPipeline, images: Sequence[np.ndarray]) -> list[Features]:
    """Each image at the bundle's size -> its augmented views' encoder outputs (the original first)."""
    out = []
    for im in images:
        views = augment_views(resize_uint8([im], pipe.image_size)[0])
        out.append(pipe.encode(np.stack(views)))
    return out


def extend_reference(parent: Reference, config: ScoringConfig, added: list[Features], *, ratio: float,
                     max_rows: int, seed: int = 0) -> tuple[Reference, dict[str, Any]]:
    """The parent's reference with ``added`` images in its banks, its bank-dependent constants re-measured.

    Returns the new reference and the manifest's ``memory_bank.coreset`` record.
    """
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
        _stats_constants(ref, parent, added, which)
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
    return ref, info


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


def _stats_constants(ref: Reference, parent: Reference, added: list[Features], which: np.ndarray) -> None:
    """The statistics bank grows by every added view; its scale and leave-one-out constants re-measured."""
    if parent.stats_bank is None:
        raise ValueError("the bundle uses the statistics branch but has no stats_bank")
    per = [feature_stats(f["patch"]) for f in added]
    bank = np.concatenate([parent.stats_bank.astype(np.float64), *per])
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
