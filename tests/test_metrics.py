"""Metrics: checked against scikit-learn, hand-computed cases and a brute-force MVTec AUPRO.

The brute-force PRO below is written straight from the definition (one binary prediction per
threshold, one scipy.ndimage.label per mask, a loop over regions), so it shares no code with the
vectorized implementation it checks.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from o2n_edge.detection_metrics import (
    METRIC_KEYS,
    compute_metrics,
    image_ap,
    image_auroc,
    image_f1max,
    mean_std,
    pixel_auroc,
    pixel_pro,
    pro_curve,
)

SEEDS = (0, 1, 2, 3)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _random_masks_maps(seed: int, n: int = 4, size: int = 32, quantize: bool = False):
    """Blob masks (some images without defects) and maps that score defects a bit higher."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n):
        if i == 0:
            continue  # one good image: contributes only good pixels
        for _ in range(rng.integers(1, 4)):
            h, w = rng.integers(1, 8, size=2)
            y, x = rng.integers(0, size - 8, size=2)
            masks[i, y : y + h, x : x + w] = True
    maps = rng.normal(size=masks.shape) + masks * rng.uniform(0.5, 2.5)
    if quantize:
        maps = np.round(maps * 2.0)  # heavy ties, including at the PRO cut-off
    return masks, maps.astype(np.float32)


def _brute_force_pro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> float:
    """AUPRO by the definition: every distinct score is a threshold, regions by 8-connectivity."""
    region_masks = []
    for i, mask in enumerate(masks):
        labeled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        region_masks += [(i, labeled == k) for k in range(1, n + 1)]
    good = ~masks
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        xs.append((pred & good).sum() / good.sum())
        ys.append(np.mean([(pred[i] & r).sum() / r.sum() for i, r in region_masks]))
    xs.append(1.0)
    ys.append(1.0)
    xs_arr, ys_arr = np.array(xs), np.array(ys)
    inside = xs_arr <= fpr_limit
    x_in, y_in = list(xs_arr[inside]), list(ys_arr[inside])
    if x_in[-1] < fpr_limit:
        j = int(np.argmax(xs_arr > fpr_limit))
        x0, y0, x1, y1 = x_in[-1], y_in[-1], xs_arr[j], ys_arr[j]
        x_in.append(fpr_limit)
        y_in.append(y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0))
    return float(np.trapezoid(y_in, x_in)) / fpr_limit


def _brute_force_f1max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Max F1 over "score >= t" for every distinct score."""
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = np.sum(pred & (labels == 1))
        fp = np.sum(pred & (labels == 0))
        fn = np.sum(~pred & (labels == 1))
        if tp:
            best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


# --------------------------------------------------------------------------------------------
# image metrics
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_image_metrics_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=200)
    scores = rng.normal(size=200) + labels * 0.7
    scores[::7] = np.round(scores[::7])  # some ties
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_ap(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert image_f1max(labels, scores) == pytest.approx(_brute_force_f1max(labels, scores), abs=1e-12)


def test_image_metrics_hand_cases() -> None:
    labels = [0, 0, 1, 1]
    assert image_auroc(labels, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert image_ap(labels, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert image_f1max(labels, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert image_auroc(labels, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert image_auroc(labels, [0.5, 0.5, 0.5, 0.5]) == 0.5
    # Boolean labels are accepted.
    assert image_auroc(np.array(labels, dtype=bool), [0.1, 0.2, 0.8, 0.9]) == 1.0


def test_f1max_by_hand() -> None:
    # scores 0.9(+) 0.8(-) 0.3(+) 0.1(-):
    #   t=0.9: P=1,   R=1/2 -> F1 2/3
    #   t=0.8: P=1/2, R=1/2 -> F1 1/2
    #   t=0.3: P=2/3, R=1   -> F1 0.8   <- max
    #   t=0.1: P=1/2, R=1   -> F1 2/3
    assert image_f1max([1, 0, 1, 0], [0.9, 0.8, 0.3, 0.1]) == pytest.approx(0.8)


@pytest.mark.parametrize("fn", [image_auroc, image_ap, image_f1max])
def test_image_metrics_reject_degenerate_inputs(fn) -> None:
    with pytest.raises(ValueError, match="single class"):
        fn([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="single class"):
        fn([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        fn([0, 1, 1], [0.1, float("nan"), 0.3])
    with pytest.raises(ValueError, match="differ in length"):
        fn([0, 1, 1], [0.1, 0.3])
    with pytest.raises(ValueError, match="binary"):
        fn([0, 1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="empty"):
        fn([], [])


# --------------------------------------------------------------------------------------------
# pixel AUROC
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("quantize", [False, True])
def test_pixel_auroc_matches_sklearn(seed: int, quantize: bool) -> None:
    masks, maps = _random_masks_maps(seed, quantize=quantize)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    assert pixel_auroc(masks.astype(np.uint8) * 255, maps.astype(np.float64)) == pytest.approx(expected, abs=1e-12)


def test_pixel_metrics_reject_bad_input() -> None:
    masks, maps = _random_masks_maps(0)
    for fn in (pixel_auroc, pixel_pro):
        with pytest.raises(ValueError, match="no anomalous pixel"):
            fn(np.zeros_like(masks), maps)
        with pytest.raises(ValueError, match="no good pixel"):
            fn(np.ones_like(masks), maps)
        bad = maps.copy()
        bad[1, 2, 3] = np.nan
        with pytest.raises(ValueError, match="NaN"):
            fn(masks, bad)
        with pytest.raises(ValueError, match="differ in shape"):
            fn(masks, maps[:, :-1])
        with pytest.raises(ValueError, match="N x H x W"):
            fn(masks[0], maps[0])


# --------------------------------------------------------------------------------------------
# PRO
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_thresholds", [None, 200, 5])
def test_pro_perfect_map_is_one(num_thresholds) -> None:
    masks, _ = _random_masks_maps(3)
    assert pixel_pro(masks, masks.astype(np.float32), num_thresholds=num_thresholds) == pytest.approx(1.0)
    # Any strictly monotone transform of a perfect map is still perfect.
    maps = np.where(masks, 5.0, -3.0) + 0.01 * np.random.default_rng(0).random(masks.shape)
    assert pixel_pro(masks, maps, num_thresholds=num_thresholds) == pytest.approx(1.0)


@pytest.mark.parametrize("num_thresholds", [None, 200])
def test_pro_constant_map(num_thresholds) -> None:
    # All scores tie: the only curve point is (1, 1), so the curve is (0,0) -> (1,1), the
    # diagonal. Its area up to 0.3 is 0.3**2 / 2 = 0.045; normalized by 0.3: 0.15.
    masks, _ = _random_masks_maps(1)
    maps = np.full(masks.shape, 0.7, dtype=np.float32)
    assert pixel_pro(masks, maps, num_thresholds=num_thresholds) == pytest.approx(0.15)
    assert pixel_pro(masks, maps, fpr_limit=1.0, num_thresholds=num_thresholds) == pytest.approx(0.5)


@pytest.mark.parametrize("num_thresholds", [None, 200])
def test_pro_averages_over_regions_not_pixels(num_thresholds) -> None:
    # Region A: 2x2 = 4 pixels; region B: 4x4 = 16 pixels; the map scores 1 on one region only.
    # Threshold 1: FPR 0, PRO = (1 + 0) / 2 = 0.5 whichever region is caught.
    # Curve (0,0) (0,0.5) (1,1): y(0.3) = 0.65, area = 0.5 * (0.5 + 0.65) * 0.3 = 0.1725,
    # normalized: 0.575.
    masks = np.zeros((1, 16, 16), dtype=bool)
    masks[0, 1:3, 1:3] = True
    masks[0, 8:12, 8:12] = True
    small_only = np.zeros(masks.shape, dtype=np.float32)
    small_only[0, 1:3, 1:3] = 1.0
    large_only = np.zeros(masks.shape, dtype=np.float32)
    large_only[0, 8:12, 8:12] = 1.0
    pro_small = pixel_pro(masks, small_only, num_thresholds=num_thresholds)
    pro_large = pixel_pro(masks, large_only, num_thresholds=num_thresholds)
    assert pro_small == pytest.approx(0.575)
    assert pro_large == pytest.approx(0.575)
    # Pixel AUROC weighs pixels: 4/20 caught + half of the 16/20 tied = 0.6; vs 16/20 + 2/20 = 0.9.
    assert pixel_auroc(masks, small_only) == pytest.approx(0.6)
    assert pixel_auroc(masks, large_only) == pytest.approx(0.9)


def test_pro_uses_8_connectivity() -> None:
    # A single pixel touching a 2x2 block only diagonally: one 5-pixel region under
    # 8-connectivity (MVTec's structure), two regions under 4-connectivity.
    # The map catches the single pixel: PRO at FPR 0 is 1/5 (would be 0.5 with 4-connectivity).
    # Curve (0,0) (0,0.2) (1,1): y(0.3) = 0.44, area 0.5 * (0.2 + 0.44) * 0.3 = 0.096 -> 0.32.
    masks = np.zeros((1, 8, 8), dtype=bool)
    masks[0, 2, 2] = True
    masks[0, 3:5, 3:5] = True
    maps = np.zeros(masks.shape, dtype=np.float32)
    maps[0, 2, 2] = 1.0
    assert pixel_pro(masks, maps, num_thresholds=None) == pytest.approx(0.32)
    assert pixel_pro(masks, maps) == pytest.approx(0.32)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_pro_matches_brute_force(seed: int, quantize: bool, fpr_limit: float) -> None:
    masks, maps = _random_masks_maps(seed, quantize=quantize)
    expected = _brute_force_pro(masks, maps, fpr_limit)
    exact = pixel_pro(masks, maps, fpr_limit=fpr_limit, num_thresholds=None)
    binned = pixel_pro(masks, maps, fpr_limit=fpr_limit, num_thresholds=200)
    assert exact == pytest.approx(expected, abs=1e-9)
    # 200 thresholds over [0, fpr_limit]: the spacing, hence the error, grows with the limit.
    assert binned == pytest.approx(expected, abs=1e-3 * max(1.0, fpr_limit / 0.3))
    assert 0.0 <= binned <= 1.0


def test_pro_curve_shape() -> None:
    masks, maps = _random_masks_maps(2)
    fprs, pros = pro_curve(masks, maps)
    assert fprs[0] == 0.0 and pros[0] == 0.0 and fprs[-1] == 1.0 and pros[-1] == 1.0
    assert np.all(np.diff(fprs) >= 0) and np.all(np.diff(pros) >= 0)
    assert np.any((fprs > 0.3) & (fprs < 1.0)), "the curve must reach past the limit to interpolate"


def test_pro_rejects_bad_parameters() -> None:
    masks, maps = _random_masks_maps(0)
    with pytest.raises(ValueError, match="fpr_limit"):
        pixel_pro(masks, maps, fpr_limit=0.0)
    with pytest.raises(ValueError, match="num_thresholds"):
        pixel_pro(masks, maps, num_thresholds=0)


# --------------------------------------------------------------------------------------------
# compute_metrics, mean_std
# --------------------------------------------------------------------------------------------


def test_compute_metrics_all_keys() -> None:
    masks, maps = _random_masks_maps(0)
    labels = masks.reshape(len(masks), -1).any(axis=1).astype(int)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    out = compute_metrics(labels, scores, masks, maps)
    assert tuple(out) == METRIC_KEYS
    assert out["image_auroc"] == image_auroc(labels, scores)
    assert out["image_ap"] == image_ap(labels, scores)
    assert out["image_f1max"] == image_f1max(labels, scores)
    assert out["pixel_auroc"] == pixel_auroc(masks, maps)
    assert out["pixel_pro"] == pixel_pro(masks, maps, num_thresholds=None)
    assert all(0.0 <= v <= 1.0 for v in out.values())


def test_compute_metrics_without_pixel_annotations() -> None:
    labels = [0, 1, 0, 1]
    scores = [0.1, 0.9, 0.2, 0.3]
    out = compute_metrics(labels, scores)
    assert out["pixel_auroc"] is None and out["pixel_pro"] is None
    assert out["image_auroc"] == 1.0
    masks = np.zeros((4, 8, 8), dtype=bool)
    maps = np.random.default_rng(0).random((4, 8, 8))
    out = compute_metrics(labels, scores, masks, maps)
    assert out["pixel_auroc"] is None and out["pixel_pro"] is None


def test_compute_metrics_rejects_mismatches() -> None:
    masks, maps = _random_masks_maps(0)
    labels = [0, 1, 1, 1]
    scores = [0.1, 0.5, 0.6, 0.7]
    with pytest.raises(ValueError, match="both masks and maps"):
        compute_metrics(labels, scores, masks=masks)
    with pytest.raises(ValueError, match="one per label"):
        compute_metrics(labels[:3], scores[:3], masks, maps)
    with pytest.raises(ValueError, match="differ in shape"):
        compute_metrics(labels, scores, masks, maps[:, 1:])
    with pytest.raises(ValueError, match="single class"):
        compute_metrics([1, 1, 1, 1], scores, masks, maps)


def test_mean_std_is_population_std() -> None:
    mean, std = mean_std([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert std == pytest.approx(math.sqrt(2.0 / 3.0))
    assert mean_std([0.9]) == (0.9, 0.0)
    with pytest.raises(ValueError, match="non-empty"):
        mean_std([])
    with pytest.raises(ValueError, match="None"):
        mean_std([0.5, None])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="NaN"):
        mean_std([0.5, float("nan")])
