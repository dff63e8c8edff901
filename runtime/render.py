"""Pictures an operator can read: heat-map colouring, overlays, side-by-side strips, PNG bytes.

numpy + pillow only (runtime rule: no torch, no matplotlib). The colour map is a fixed
piecewise-linear "jet" computed here, so the same map value is the same colour on every device
and in every report.
"""

from __future__ import annotations

import base64
import io
from typing import Sequence

import numpy as np
from PIL import Image

# zlib level for PNGs sent over HTTP: 1 is ~5x faster than the default 6 and only a little
# larger, which matters when encoding is on the request path.
PNG_COMPRESS_LEVEL = 1
# Weight of the heat map when blended over the query.
OVERLAY_ALPHA = 0.45
# Pixels of background between panels in a side-by-side strip.
STRIP_GAP = 4
STRIP_BACKGROUND = (32, 32, 32)
# Map values are resized with bilinear interpolation: smooth, and no overshoot beyond the range.
MAP_RESAMPLE = Image.Resampling.BILINEAR


def normalize_map(
    anomaly_map: np.ndarray, vmin: float | None = None, vmax: float | None = None
) -> np.ndarray:
    """Scale a float map to [0, 1] (float32); NaN/inf become the low end.

    Default range is the map's own min..max: it shows *where* in this image the evidence is.
    Pass a fixed ``vmin``/``vmax`` to compare images on one scale (a per-image range makes a
    clean image's noise look as hot as a real defect).
    """
    m = np.asarray(anomaly_map, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"anomaly map must be 2-D (H, W), got shape {m.shape}")
    finite = np.isfinite(m)
    any_finite = bool(finite.any())
    if vmin is not None:
        lo = float(vmin)
    else:
        lo = float(np.min(m[finite])) if any_finite else 0.0
    if vmax is not None:
        hi = float(vmax)
    else:
        hi = float(np.max(m[finite])) if any_finite else 1.0
    span = hi - lo if hi - lo > 1e-12 else 1.0
    out = (np.where(finite, m, lo) - lo) / span
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def colorize(values01: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8 (H, W, 3) "jet" colours (blue = low, red = high)."""
    x = np.clip(np.asarray(values01, dtype=np.float32), 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4.0 * x - 3.0), 0.0, 1.0)
    g = np.clip(1.5 - np.abs(4.0 * x - 2.0), 0.0, 1.0)
    b = np.clip(1.5 - np.abs(4.0 * x - 1.0), 0.0, 1.0)
    return np.rint(np.stack([r, g, b], axis=-1) * 255.0).astype(np.uint8)


def resize_map(anomaly_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a float map to (height, width) without quantising it to 8 bit first."""
    m = np.asarray(anomaly_map, dtype=np.float32)
    if m.shape == (height, width):
        return m
    resized = Image.fromarray(np.ascontiguousarray(m)).resize((width, height), MAP_RESAMPLE)
    return np.asarray(resized, dtype=np.float32)


def heatmap(
    anomaly_map: np.ndarray, vmin: float | None = None, vmax: float | None = None
) -> np.ndarray:
    """Float map -> uint8 (H, W, 3) coloured heat map (see :func:`normalize_map` for range)."""
    return colorize(normalize_map(anomaly_map, vmin, vmax))


def overlay(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    alpha: float = OVERLAY_ALPHA,
    vmin: float | None = None,
    vmax: float | None = None,
) -> np.ndarray:
    """Blend the coloured map over an RGB uint8 image (map resized to the image)."""
    img = _rgb(image)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    h, w = img.shape[:2]
    colours = heatmap(resize_map(anomaly_map, h, w), vmin, vmax).astype(np.float32)
    mixed = (1.0 - alpha) * img.astype(np.float32) + alpha * colours
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def side_by_side(
    images: Sequence[np.ndarray], gap: int = STRIP_GAP, height: int | None = None
) -> np.ndarray:
    """Panels left to right at one height (default: the first panel's), with a gap between."""
    panels = [_rgb(im) for im in images if im is not None]
    if not panels:
        raise ValueError("side_by_side needs at least one image")
    h = int(height or panels[0].shape[0])
    scaled = []
    for p in panels:
        if p.shape[0] != h:
            w = max(1, round(p.shape[1] * h / p.shape[0]))
            p = np.asarray(Image.fromarray(p).resize((w, h), Image.Resampling.BILINEAR))
        scaled.append(p)
    total_w = sum(p.shape[1] for p in scaled) + gap * (len(scaled) - 1)
    strip = np.empty((h, total_w, 3), dtype=np.uint8)
    strip[:] = STRIP_BACKGROUND
    x = 0
    for p in scaled:
        strip[:, x : x + p.shape[1]] = p
        x += p.shape[1] + gap
    return strip


def encode_png(image: np.ndarray, compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """uint8 (H, W) gray or (H, W, 3) RGB -> PNG bytes."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"encode_png wants uint8, got {arr.dtype}")
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(f"encode_png wants (H, W), (H, W, 3) or (H, W, 4), got {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(
        buf, format="PNG", compress_level=compress_level
    )
    return buf.getvalue()


def b64(data: bytes) -> str:
    """Bytes as base64 text (for JSON answers)."""
    return base64.b64encode(data).decode("ascii")


def png_base64(image: np.ndarray) -> str:
    """An image as base64 PNG text, ready for JSON or a ``data:image/png;base64,`` URL."""
    return b64(encode_png(image))


def map_png_gray(anomaly_map: np.ndarray) -> tuple[bytes, float, float]:
    """A float map as an 8-bit gray PNG plus the (min, max) it was scaled from.

    ``value ~= min + gray / 255 * (max - min)``: a client can recover the map to 1/255 of its
    range from a plain image file.
    """
    m = np.asarray(anomaly_map, dtype=np.float32)
    finite = m[np.isfinite(m)]
    lo = float(finite.min()) if finite.size else 0.0
    hi = float(finite.max()) if finite.size else 0.0
    gray = np.rint(normalize_map(m, lo, hi) * 255.0).astype(np.uint8)
    return encode_png(gray), lo, hi


def side_by_side_png(
    query: np.ndarray, normal: np.ndarray | None, anomaly_map: np.ndarray | None
) -> bytes:
    """The operator's one-glance picture: query | normal version | overlay, as PNG bytes."""
    panels: list[np.ndarray] = [query]
    if normal is not None:
        panels.append(normal)
    if anomaly_map is not None:
        panels.append(overlay(query, anomaly_map))
    return encode_png(side_by_side(panels))


def _rgb(image: np.ndarray) -> np.ndarray:
    """Accept uint8 gray or RGB; return contiguous uint8 (H, W, 3)."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected (H, W) or (H, W, 3), got {arr.shape}")
    return np.ascontiguousarray(arr)
