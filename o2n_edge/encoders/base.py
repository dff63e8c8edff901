"""The feature-encoder contract shared by scoring, export and the runtime.

Every encoder maps already-preprocessed pixels to a dict of tensors with fixed keys, so the
triplet scoring code, the ONNX exporter and the torch-free runtime can treat CLIP and
EfficientNet-Lite0 alike:

- ``"patch"``      (B, h, w, patch_dim)  features for nearest-neighbour scoring (memory bank and
  query-vs-normal-version distances);
- ``"global"``     (B, global_dim)       an image-level feature;
- ``"patch_text"`` (B, h, w, global_dim) patch tokens in the joint image-text space (only when
  ``has_text``), compared with the prompt ensembles of the WinCLIP-style text branch.

Preprocessing is defined once, in numpy + PIL (:func:`preprocess_numpy`), and the torch path
calls the very same function: a score that changes after export because resizing or
normalization differed between Python and the runtime is the classic deployment bug
(DESIGN.md, "Lessons from the field"), and sharing one implementation makes parity exact.
The runtime replicates :func:`preprocess_numpy` from the constants below (PIL bicubic resize,
``/255``, ``(x - mean) / std`` in float32), because this module imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
from PIL import Image

from .._lazy import require

torch = require("torch", "the feature encoders")
nn = torch.nn

# PIL's bicubic resize antialiases when downscaling (its filter support scales with the ratio),
# which is what CLIP's and timm's eval transforms do for these models.
RESAMPLE = Image.Resampling.BICUBIC
PIXEL_SCALE = 255.0  # uint8 -> [0, 1]
DEFAULT_BATCH_SIZE = 16

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
) -> np.ndarray:
    """Resize + normalize to the encoder input (B,3,S,S) float32, with numpy and PIL only.

    This is the single definition of preprocessing: :meth:`FeatureEncoder.preprocess` calls it,
    so torch and the torch-free runtime feed the network byte-identical inputs.
    """
    pixels = resize_uint8(images, image_size).astype(np.float32) / np.float32(PIXEL_SCALE)
    mean_a = np.asarray(mean, dtype=np.float32).reshape(1, 1, 1, 3)
    std_a = np.asarray(std, dtype=np.float32).reshape(1, 1, 1, 3)
    pixels = (pixels - mean_a) / std_a
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32)


class FeatureEncoder(nn.Module):
    """Base class of the scoring encoders: preprocessed pixels -> {"patch","global"[,"patch_text"]}.

    Subclasses set the attributes below in ``__init__`` and implement :meth:`forward`, which must
    stay ONNX-exportable (fixed output keys, no data-dependent Python control flow) because the
    exported graph is what the line-side runtime runs.
    """

    output_names: ClassVar[tuple[str, ...]] = ("patch", "global")

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    has_text: bool = False
    patch_dim: int
    global_dim: int
    grid: tuple[int, int]

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover
        """(B,3,S,S) normalized pixels -> dict keyed by :attr:`output_names`."""
        raise NotImplementedError

    def preprocess(self, images: ImagesLike) -> torch.Tensor:
        """uint8 images -> (B,3,S,S) float32 tensor, via :func:`preprocess_numpy` (exact parity)."""
        arr = preprocess_numpy(images, self.image_size, self.mean, self.std)
        return torch.from_numpy(arr)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> (N, global_dim) L2-normalized text features (encoders with a text tower)."""
        raise NotImplementedError(f"{type(self).__name__} has no text tower (has_text=False)")

    def describe(self) -> dict[str, object]:
        """Static facts the export manifest records (sizes, normalization, output names)."""
        return {
            "encoder": type(self).__name__,
            "image_size": int(self.image_size),
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            "has_text": bool(self.has_text),
            "patch_dim": int(self.patch_dim),
            "global_dim": int(self.global_dim),
            "grid": [int(v) for v in self.grid],
            "output_names": list(self.output_names),
        }


def encode_images(
    encoder: FeatureEncoder,
    images: ImagesLike,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict[str, np.ndarray]:
    """Run ``encoder`` over uint8 images in batches; returns float32 numpy arrays per output.

    Batching bounds memory on large evaluation sets; inference mode skips autograd bookkeeping.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    items = _as_image_list(images)
    try:
        device = next(encoder.parameters()).device
    except StopIteration:  # pragma: no cover - every real encoder has parameters
        device = torch.device("cpu")
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in encoder.output_names}
    with torch.inference_mode():
        for start in range(0, len(items), batch_size):
            pixels = encoder.preprocess(items[start:start + batch_size]).to(device)
            out = encoder(pixels)
            for name in encoder.output_names:
                chunks[name].append(out[name].float().cpu().numpy())
    return {name: np.concatenate(parts, axis=0).astype(np.float32, copy=False)
            for name, parts in chunks.items()}
