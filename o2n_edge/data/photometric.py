"""Brightness matching: lighting that drifts must not score as a defect.

Why: patch features of a CNN move with the overall brightness of the image, so a good part that
is simply lit brighter than the shots sits far from every bank row and scores as an anomaly; a
few shots rarely cover the lighting a line will see. So every image (the shots at export, each
query on the device) whose mean grey level lies outside the shots' own range, widened by a
tolerance, is brought back to the nearest edge of that range by one gain. Inside the range
nothing changes: the brightness differences the shots themselves show are normal, and a
small change of overall brightness that comes with a defect (a stain, missing material) is kept.

A gain, not an offset or a contrast stretch: exposure and lamp intensity scale the pixel values,
and a gain keeps colours and local contrast as they are, so local defects (a crack, a blob) are
untouched. It is applied to float pixels inside preprocessing, so dark images are not
re-quantized. The bundle records the range; numpy only, so the device applies it exactly as
``eval`` and ``export`` do.
"""

from __future__ import annotations

import numpy as np

# A gain outside this range means a black or blown-out frame: matching it would only amplify
# noise, so the gain is clipped and such an image still looks wrong (as it should).
MIN_GAIN, MAX_GAIN = 0.25, 4.0
MIN_BRIGHTNESS = 1.0  # grey level below which an image counts as black

BrightnessRange = tuple[float, float]  # (lo, hi) mean grey levels, 0..255


def brightness(image: np.ndarray) -> float:
    """Mean grey level (0..255) of a uint8 HxWx3 (or HxW) image: what a gain scales exactly."""
    return float(np.asarray(image, dtype=np.float64).mean())


def shots_range(shot_images: list[np.ndarray], tolerance: float | None) -> BrightnessRange | None:
    """The grey-level range images are kept in: the shots' own, widened by ``tolerance`` (a
    fraction) on each side; None when matching is off (``tolerance`` None)."""
    if tolerance is None:
        return None
    if not shot_images:
        raise ValueError("no shots to measure a brightness range on")
    levels = [brightness(im) for im in shot_images]
    return round(min(levels) * (1.0 - tolerance), 4), round(max(levels) * (1.0 + tolerance), 4)


def image_levels(images: np.ndarray) -> np.ndarray:
    """(B,) mean grey levels of uint8 (B,H,W,3) images, floored at MIN_BRIGHTNESS."""
    return np.maximum(np.asarray(images, dtype=np.float64).reshape(len(images), -1).mean(axis=1), MIN_BRIGHTNESS)


def gains_for_levels(levels: np.ndarray, level_range: BrightnessRange) -> np.ndarray:
    """(B,) gains that bring images of these mean grey levels into ``level_range`` (1 inside it)."""
    lo, hi = level_range
    return np.clip(np.clip(levels, lo, hi) / levels, MIN_GAIN, MAX_GAIN)


def brightness_gains(images: np.ndarray, level_range: BrightnessRange) -> np.ndarray:
    """(B,) gains that bring each uint8 image of (B,H,W,3) into ``level_range`` (1 inside it)."""
    return gains_for_levels(image_levels(images), level_range)


def apply_gains(pixels: np.ndarray, gains: np.ndarray) -> np.ndarray:
    """(B,H,W,3) float pixels in 0..1 times one gain each, saturating at 1 as a camera would."""
    g = np.asarray(gains, dtype=np.float32).reshape(-1, 1, 1, 1)
    return np.minimum(pixels * g, np.float32(1.0))
