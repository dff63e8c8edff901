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
normalization differed between Python and the runtime is the classic deployment bug,
and sharing one implementation makes parity exact.
The runtime replicates :func:`preprocess_numpy` from the constants below (PIL bicubic resize,
``/255``, ``(x - mean) / std`` in float32), because this module imports torch.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from .._lazy import require
from ..data.tiling import TileLayout, split_tiles, stitch_outputs, tile_layout
from ..data.photometric import BrightnessRange
from ..data.preprocess import ImagesLike, _as_image_list, preprocess_numpy, resize_uint8  # noqa: F401  (re-exported)

torch = require("torch", "the feature encoders")
nn = torch.nn

DEFAULT_BATCH_SIZE = 16


class FeatureEncoder(nn.Module):
    """Base class of the scoring encoders: preprocessed pixels -> {"patch","global"[,"patch_text"]}.

    Subclasses set the attributes below in ``__init__`` and implement :meth:`forward`, which must
    stay ONNX-exportable (fixed output keys, no data-dependent Python control flow) because the
    exported graph is what the line-side runtime runs.
    """

    output_names: ClassVar[tuple[str, ...]] = ("patch", "global")
    # True: encode_images may run the traced graph on onnxruntime on the CPU (see onnx_runner)
    onnx_encoding: ClassVar[bool] = False

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

    @property
    def layout(self) -> TileLayout:
        """How an image is tiled for this encoder (one tile = the whole image unless the spec tiles)."""
        spec = getattr(self, "spec", None)
        return tile_layout(self.image_size, getattr(spec, "tiles", 1), getattr(spec, "tile_overlap", 0.25))

    @property
    def input_size(self) -> int:
        """Side every image is resized to (the scoring map's side): a tile, or the tiled square."""
        return self.layout.side

    def preprocess(self, images: ImagesLike, brightness_range: BrightnessRange | None = None) -> torch.Tensor:
        """uint8 images -> the graph's (B*tiles,3,S,S) float32 input, via :func:`preprocess_numpy`."""
        arr = preprocess_numpy(images, self.input_size, self.mean, self.std, brightness_range)
        return torch.from_numpy(split_tiles(arr, self.layout))

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
            "tiling": self.layout.to_dict(),
        }


def encode_images(
    encoder: FeatureEncoder,
    images: ImagesLike,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: str | None = None,
    brightness_range: BrightnessRange | None = None,
) -> dict[str, np.ndarray]:
    """Run ``encoder`` over uint8 images in batches; returns float32 numpy arrays per output.

    Batching bounds memory on large evaluation sets; inference mode skips autograd bookkeeping.
    On the CPU an encoder that opts in runs as its traced graph on onnxruntime
    (:mod:`.onnx_runner`): the same features to float32 noise, about three times faster.
    ``progress``: a label to show a progress bar over the batches under (None: silent).
    """
    from ..progress import progress_iter
    from .onnx_runner import onnx_runner_for

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    items = _as_image_list(images)
    layout = encoder.layout
    try:
        device = next(encoder.parameters()).device
    except StopIteration:  # pragma: no cover - every real encoder has parameters
        device = torch.device("cpu")
    runner = onnx_runner_for(encoder) if items else None
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in encoder.output_names}
    with torch.inference_mode():
        starts = range(0, len(items), batch_size)
        for start in progress_iter(starts, progress or "", enabled=progress is not None):
            pixels = encoder.preprocess(items[start:start + batch_size], brightness_range)
            if runner is not None:
                out = runner(pixels.numpy())
            else:
                out = {k: v.float().cpu().numpy() for k, v in encoder(pixels.to(device)).items()}
            for name in encoder.output_names:
                chunks[name].append(out[name])
    out = {name: np.concatenate(parts, axis=0).astype(np.float32, copy=False)
           for name, parts in chunks.items()}
    return stitch_outputs(out, layout)
