"""From scored test images to the report's figures: operating points, per-type results, the misses.

Everything the HTML page shows comes from the document :func:`analyze` returns (it is also the
report's JSON), so the page and the JSON can never disagree.
"""

from __future__ import annotations

import numpy as np

from o2n_edge.acceptance.collect import ScoredSet, relative_name
from o2n_edge.acceptance.operating_point import (
    CONFIDENCE,
    TARGET_FRR,
    operating_point,
    per_type_escapes,
    threshold_for_frr,
)
from o2n_edge.detection_metrics import compute_metrics

# Images in each gallery row (worst escapes, worst false rejects).
GALLERY_SIZE = 6


def _pixel_metrics(masks: np.ndarray | None, maps: np.ndarray | None, idx: np.ndarray) -> dict:
    if masks is None or maps is None or not masks[idx].any():
        return {"pixel_auroc": None, "pixel_pro": None}
    from o2n_edge.detection_metrics import pixel_auroc, pixel_pro

    return {"pixel_auroc": pixel_auroc(masks[idx], maps[idx]),
            "pixel_pro": pixel_pro(masks[idx], maps[idx], num_thresholds=None)}


def analyze(
    scored: ScoredSet,
    threshold: float,
    target_frr: float = TARGET_FRR,
    confidence: float = CONFIDENCE,
    gallery_size: int = GALLERY_SIZE,
) -> dict:
    """The report document (JSON-ready): overall, per defect type, per image, gallery picks."""
    y, s = scored.labels, scored.scores
    # Every rate below recounts "score > threshold"; that must be the rule the runtime decided by.
    disagree = np.flatnonzero(scored.decisions != (s > threshold))
    if disagree.size:
        first = scored.samples[int(disagree[0])]
        raise ValueError(f"the runtime's decision differs from 'score > threshold {threshold:.6g}' on "
                         f"{disagree.size} image(s), e.g. {relative_name(first)}: the report cannot recount its rates")
    defects = np.asarray(scored.defects)
    good = s[y == 0]
    t_target = threshold_for_frr(good, target_frr)
    at_bundle = operating_point(y, s, threshold, confidence)
    at_target = operating_point(y, s, t_target, confidence)

    overall = compute_metrics(y, s, scored.masks, scored.maps)
    escapes = per_type_escapes(defects, s, (threshold, t_target), confidence)
    per_type = []
    for name, (esc, esc_target) in escapes.items():
        idx = np.flatnonzero((defects == name) | (y == 0))
        per_type.append({
            "defect": name,
            "n": esc.n,
            "escape": esc.to_json(),
            "escape_at_target": esc_target.to_json(),
            "image_auroc": float(compute_metrics(y[idx], s[idx])["image_auroc"]),
            **_pixel_metrics(scored.masks, scored.maps, idx),
        })

    images = [
        {"file": relative_name(smp), "defect": smp.defect, "label": int(smp.label), "score": float(sc),
         "rejected": bool(sc > threshold)}
        for smp, sc in zip(scored.samples, s)
    ]
    # Gallery: the defects with the lowest scores (escapes first) and the goods with the highest.
    bad_idx = np.flatnonzero(y == 1)
    good_idx = np.flatnonzero(y == 0)
    lowest_bad = bad_idx[np.argsort(s[bad_idx], kind="stable")][:gallery_size]
    highest_good = good_idx[np.argsort(-s[good_idx], kind="stable")][:gallery_size]
    return {
        "n_test": int(y.size),
        "n_good": int(good.size),
        "n_defective": int(y.sum()),
        "confidence": confidence,
        "target_frr": target_frr,
        "metrics": overall,
        "at_bundle_threshold": at_bundle.to_json(),
        "at_target_frr": at_target.to_json(),
        "per_type": per_type,
        "images": images,
        "gallery": {"escapes": [int(i) for i in lowest_bad], "false_rejects": [int(i) for i in highest_good]},
    }
