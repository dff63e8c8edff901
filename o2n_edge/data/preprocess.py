"""Encoder input preprocessing in numpy + PIL: the single definition torch and the runtime share.

It lives outside the encoders package so the torch-free runtime can import it: the exported
image encoder must see byte-identical inputs on the device and in the torch reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from o2n_edge.data.photometric import BrightnessRange, apply_gains, brightness_gains

# PIL's bicubic resize antialiases when downscaling (its filter support scales with the ratio),
# which is what CLIP's and timm's eval transforms do for these models.
RESAMPLE = Image.Resampling.BICUBIC
PIXEL_SCALE = 255.0  # uint8 -> [0, 1]

ImagesLike = np.ndarray | Sequence[np.ndarray]


def _as_image_list(images: ImagesLike) -> list[np.ndarray]:
    """Accept a (B,H,W,3) uint8 array or a list of HxWx3 (or HxW grey) uint8 arrays."""
    if isinstance(images, np.ndarray):
        if images.ndim == 3:  # a single image passed without a batch axis
            images = images[None]
        if images.ndim != 4:
            raise ValueError(f"expected images of shape (B,H,W,3), got {images.shape}")
        items = list(images)
    else:
        items = list(images)
    if not items:
        raise ValueError("no images given")
    out = []
    for i, img in enumerate(items):
        img = np.asarray(img)
        if img.dtype != np.uint8:
            raise ValueError(f"image {i}: expected uint8 pixels, got {img.dtype}")
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"image {i}: expected HxWx3 RGB, got shape {img.shape}")
        out.append(img)
    return out


def resize_uint8(images: ImagesLike, image_size: int) -> np.ndarray:
    """Resize every image to ``image_size`` square with PIL bicubic; returns (B,S,S,3) uint8.

    Non-square inputs are squashed (not cropped): anomalies can sit at the border, and a
    centre crop would silently drop them.
    """
    size = int(image_size)
    resized = []
    for img in _as_image_list(images):
        if img.shape[0] == size and img.shape[1] == size:
            resized.append(np.ascontiguousarray(img))
        else:
            pil = Image.fromarray(np.ascontiguousarray(img))
            resized.append(np.asarray(pil.resize((size, size), RESAMPLE), dtype=np.uint8))
    return np.stack(resized)


def preprocess_numpy(
    images: ImagesLike,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    brightness_range: BrightnessRange | None = None,
) -> np.ndarray:
    """Resize + normalize to the encoder input (B,3,S,S) float32, with numpy and PIL only.

    This is the single definition of preprocessing: :meth:`FeatureEncoder.preprocess` calls it,
    so torch and the torch-free runtime feed the network byte-identical inputs.
    ``brightness_range``: (lo, hi) mean grey levels each resized image is brought into by one
    gain, in float so dark images are not re-quantized (:mod:`o2n_edge.data.photometric`);
    None = off.
    """
    resized = resize_uint8(images, image_size)
    pixels = resized.astype(np.float32) / np.float32(PIXEL_SCALE)
    if brightness_range is not None:
        pixels = apply_gains(pixels, brightness_gains(resized, brightness_range))
    mean_a = np.asarray(mean, dtype=np.float32).reshape(1, 1, 1, 3)
    std_a = np.asarray(std, dtype=np.float32).reshape(1, 1, 1, 3)
    pixels = (pixels - mean_a) / std_a
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32)
