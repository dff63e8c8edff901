"""Image and mask decoding that turns every bad input into one clear error.

This module is shared by the offline stage and the torch-free runtime, so it uses numpy and
pillow only. A line-side device sees whatever the camera or an HTTP client sends: empty
uploads, random bytes, half-written files, 16-bit or CMYK frames, palette PNGs, alpha,
decompression bombs. All of them must end in :class:`ImageError` (naming the file and the
problem), never in a partially decoded image or a crash deep inside PIL.

Conversions to the uint8 HxWx3 RGB array every model expects (documented, deterministic):

- ``1`` / ``L`` -> gray replicated to RGB.
- ``I;16*`` (16-bit) and ``I`` (32-bit int, how PIL loads some 16-bit files) -> values are
  read as 16-bit (clipped to 0..65535) and scaled to 8 bit by /257, rounded; ``F`` (float)
  follows PIL's own convention (values in 0..255, clipped).
- ``P`` -> RGB, or RGBA when the palette has a transparent entry (then composited, below).
- alpha (``RGBA``, ``LA``, ``PA``, ``La``, ``RGBa``, and L/RGB with a ``tRNS`` key) ->
  composited on **black**: ``rgb * alpha / 255``. Black is what a premultiplied pipeline and
  most "transparent = nothing there" captures produce; it is fixed so scores are reproducible.
- ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` -> RGB via PIL's converters.
- EXIF orientation is applied (``ImageOps.exif_transpose``) so a phone photo is upright.
- Multi-frame files (GIF, TIFF, MPO): the first frame.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

# Decompression-bomb guard: larger images are refused before any pixel is decoded. Kept below
# PIL's own limit (~89 Mpx) so our clear error fires first. 50 Mpx RGBA is ~200 MB.
MAX_PIXELS = 50_000_000
# Files larger than this are refused before being read (a 50 Mpx uncompressed TIFF is ~150 MB).
MAX_FILE_BYTES = 256 * 1024 * 1024
# Smallest side an *image* may have: below this no patch encoder produces a meaningful feature.
MIN_SIDE = 8
# Formats we accept. Restricting PIL's sniffing keeps exotic plugins (EPS would call
# Ghostscript) and their parsers out of reach of untrusted bytes. "JPEG" also opens MPO
# (multi-picture JPEG from phones and stereo cameras).
ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "PPM")
# Resampling for load_image(size=...): bicubic, as CLIP-style preprocessing uses.
RESAMPLE = Image.Resampling.BICUBIC

_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageError(ValueError):
    """A file or buffer that is not a usable image; the message names it and says why."""


def _open_loaded(data: bytes, name: str, min_side: int, draft_size: int | None = None) -> Image.Image:
    """Open, size-check and *fully* decode, so a problem surfaces here and not later.

    ``draft_size``: a JPEG is decoded straight to the smallest of 1/2, 1/4, 1/8 of its size that
    still covers ``draft_size`` on both sides (libjpeg's DCT scaling, PIL's draft mode): a
    fraction of the decode work when the image is resized to that size anyway.

    PIL opens lazily: ``Image.open`` reads only the header, and a truncated file would
    otherwise fail (or, with LOAD_TRUNCATED_IMAGES, silently come out half grey) at first use.
    """
    if not data:
        raise ImageError(f"{name}: empty (0 bytes), not an image")
    # Partial images must be errors. This is PIL's default; enforce it in case some other
    # library switched it on process-wide (every thread writes the same value: race-free).
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    Image.init()  # register every plugin, else Image.open(formats=...) may miss TIFF, WEBP
    try:
        im = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        width, height = im.size
        if width * height > MAX_PIXELS:
            raise ImageError(
                f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of "
                f"{MAX_PIXELS} (possible decompression bomb)"
            )
        if min(width, height) < min_side:
            raise ImageError(
                f"{name}: {width}x{height} is too small (each side must be >= {min_side} px)"
            )
        if draft_size and im.format == "JPEG":
            im.draft(None, (int(draft_size), int(draft_size)))
        im.load()
        ImageOps.exif_transpose(im, in_place=True)  # no copy for the usual upright image
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{name}: refused as a possible decompression bomb ({exc})") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageError(
            f"{name}: not a recognised image (supported: {', '.join(ALLOWED_FORMATS)})"
        ) from exc
    except MemoryError as exc:
        raise ImageError(f"{name}: not enough memory to decode") from exc
    except Exception as exc:  # noqa: BLE001 - PIL plugins raise many types on corrupt input
        detail = f"{type(exc).__name__}: {exc}"
        raise ImageError(f"{name}: corrupt or truncated image ({detail})") from exc
    return im


def _sixteen_bit_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Map 16-bit range 0..65535 onto 0..255 (x/257, rounded), so full scale stays full scale."""
    wide = np.clip(arr.astype(np.int64), 0, 65535)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def _to_rgb_array(im: Image.Image, name: str) -> np.ndarray:
    """Convert any decoded mode to uint8 HxWx3 RGB following the module's documented rules."""
    mode = im.mode
    try:
        if mode in _SIXTEEN_BIT_MODES:
            gray = _sixteen_bit_to_uint8(np.asarray(im))
            return np.repeat(gray[:, :, None], 3, axis=2)
        if mode == "F":
            gray = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0)
            gray = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
            return np.repeat(gray[:, :, None], 3, axis=2)
        has_key = "transparency" in im.info and mode in ("P", "L", "RGB", "1")
        if mode in _ALPHA_MODES or has_key:
            rgba = np.asarray(im.convert("RGBA"), dtype=np.uint16)
            rgb = (rgba[:, :, :3] * rgba[:, :, 3:4] + 127) // 255  # composite on black
            return rgb.astype(np.uint8)
        if mode != "RGB":
            im = im.convert("RGB")
        return np.asarray(im, dtype=np.uint8)
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. a mode PIL cannot convert
        raise ImageError(f"{name}: cannot convert mode {mode!r} to RGB ({exc})") from exc


def decode_image(data: bytes, name: str = "<bytes>", draft_size: int | None = None) -> np.ndarray:
    """Decode untrusted bytes into uint8 HxWx3 RGB, or raise :class:`ImageError`.

    The one entry point both stages use, so a file that the workstation accepted is decoded
    identically on the line-side device. ``draft_size``: see :func:`_open_loaded` (JPEG only; a
    bundle records whether its images were decoded so, and its pipeline decodes the same way).
    """
    im = _open_loaded(bytes(data), name, MIN_SIDE, draft_size)
    arr = _to_rgb_array(im, name)
    if arr.ndim != 3 or arr.shape[2] != 3:  # contract: a bug here must not reach a model
        raise ImageError(f"{name}: decoded to unexpected shape {arr.shape}")
    return np.ascontiguousarray(arr)


def _read_bytes(path: str | Path, what: str) -> bytes:
    """Read a file with the size limit applied first, mapping OS errors to ImageError."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ImageError(f"{p}: {size} bytes exceeds the {MAX_FILE_BYTES}-byte limit")
        return p.read_bytes()
    except FileNotFoundError as exc:
        raise ImageError(f"{p}: {what} file not found") from exc
    except IsADirectoryError as exc:
        raise ImageError(f"{p}: is a directory, expected an {what} file") from exc
    except OSError as exc:
        raise ImageError(f"{p}: cannot read {what} file ({exc})") from exc


def read_image_bytes(path: str | Path) -> bytes:
    """An image file's bytes with the size limit applied (for callers that decode them themselves)."""
    return _read_bytes(path, "image")


def _size_wh(size: int | tuple[int, int]) -> tuple[int, int]:
    """Normalise a size argument; an int is a square side, a tuple is (width, height) like PIL."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        wh = (int(size), int(size))
    elif isinstance(size, tuple) and len(size) == 2:
        wh = (int(size[0]), int(size[1]))
    else:
        raise ValueError(f"size must be an int or a (width, height) tuple, got {size!r}")
    if min(wh) < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    return wh


def load_image(path: str | Path, size: int | tuple[int, int] | None = None, draft: bool = False) -> np.ndarray:
    """Load an image file as uint8 HxWx3 RGB, optionally resized (bicubic) to ``size``.

    ``size`` as an int gives a square side; as a tuple it is (width, height), PIL's order.
    ``draft``: decode a JPEG at a reduced scale that still covers ``size`` (see decode_image).
    """
    wh = None if size is None else _size_wh(size)
    draft_size = max(wh) if draft and wh is not None else None
    arr = decode_image(_read_bytes(path, "image"), str(path), draft_size)
    if wh is None or (arr.shape[1], arr.shape[0]) == wh:
        return arr
    return np.asarray(Image.fromarray(arr).resize(wh, RESAMPLE), dtype=np.uint8)


def load_mask(path: str | Path | None, shape: tuple[int, int]) -> np.ndarray:
    """Load a ground-truth mask as bool HxW (``shape`` = (H, W)); ``None`` gives all False.

    Good images have no mask file, so ``None`` is the normal case, not an error. Any non-zero
    pixel counts as defect (MVTec masks are 0/255, others use 0/1 or a palette); resizing is
    nearest-neighbour so the mask stays binary and no defect pixel is invented or lost by
    interpolation.
    """
    height, width = int(shape[0]), int(shape[1])
    if height < 1 or width < 1:
        raise ValueError(f"mask shape must be positive (H, W), got {shape!r}")
    if path is None:
        return np.zeros((height, width), dtype=bool)
    im = _open_loaded(_read_bytes(path, "mask"), str(path), min_side=1)
    try:
        arr = np.asarray(im)
        if arr.ndim == 3:  # any colour channel set marks a defect; alpha is ignored
            n_colour = 1 if im.mode in ("LA", "La", "PA") else 3
            arr = arr[:, :, :n_colour].max(axis=2)
        binary = Image.fromarray((arr > 0).astype(np.uint8) * 255)
    except Exception as exc:  # noqa: BLE001 - odd modes that numpy cannot view
        raise ImageError(f"{path}: cannot read mask mode {im.mode!r} ({exc})") from exc
    if binary.size != (width, height):
        binary = binary.resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(binary) > 127
