"""Brightness matching: one gain per image so good parts lit differently look alike to the encoder.

Why: patch features of a CNN move with the overall brightness of the image, so a part that is
simply lit 20% brighter than the shots sits far from every bank row and scores as an anomaly; a
few shots rarely cover the lighting a line will see. Bringing every image (the shots at export,
each query on the device) to one reference brightness by a single gain removes that variation by
construction, whatever the shots show. A gain, not an offset or a contrast stretch: exposure and
lamp intensity scale the pixel values, and a gain keeps colours and local contrast as they are,
so local defects (a crack, a blob, a stain) are untouched. What it gives up: a defect that is
only a change of overall brightness; the bundle records whether it is on.

Numpy only: the runtime applies it on the device exactly as ``eval`` and ``export`` do.
"""

from __future__ import annotations

import numpy as np

# A gain outside this range means a black or blown-out frame: matching it would only amplify
# noise, so the gain is clipped and such an image still looks wrong (as it should).
MIN_GAIN, MAX_GAIN = 0.25, 4.0
MIN_BRIGHTNESS = 1.0  # grey level below which an image counts as black


def brightness(image: np.ndarray) -> float:
    """Mean grey level (0..255) of a uint8 HxWx3 (or HxW) image: what a gain scales exactly."""
    return float(np.asarray(image, dtype=np.float64).mean())


def reference_brightness(images: list[np.ndarray]) -> float:
    """The shots' median brightness: the level every image is brought to."""
    if not images:
        raise ValueError("no images to measure a reference brightness on")
    return float(np.median([brightness(im) for im in images]))


def shots_target(shot_images: list[np.ndarray], enabled: bool) -> float | None:
    """The bundle's brightness target for these (resized) shots, or None when matching is off."""
    return round(reference_brightness(shot_images), 4) if enabled else None


def brightness_gains(images: np.ndarray, target: float) -> np.ndarray:
    """(B,) gains that bring each uint8 image of (B,H,W,3) to ``target`` mean grey, clipped."""
    levels = np.asarray(images, dtype=np.float64).reshape(len(images), -1).mean(axis=1)
    return np.clip(float(target) / np.maximum(levels, MIN_BRIGHTNESS), MIN_GAIN, MAX_GAIN)


def apply_gains(pixels: np.ndarray, gains: np.ndarray) -> np.ndarray:
    """(B,H,W,3) float pixels in 0..1 times one gain each, saturating at 1 as a camera would."""
    g = np.asarray(gains, dtype=np.float32).reshape(-1, 1, 1, 1)
    return np.minimum(pixels * g, np.float32(1.0))

