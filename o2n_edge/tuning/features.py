"""Encode once, compose many: backbone stage maps cached per (network, resolution, tiling).

A sweep over layers and aggregation kernels would otherwise run the backbone once per setting.
The trunk's stage maps of every tile are kept, and any (layers, kernel) is composed from them
with :func:`o2n_edge.encoders.efficientnet.compose_patch` (the graph's own function) and
stitched like the runtime stitches graph outputs, so the features equal the exported encoder's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from o2n_edge.data.tiling import TileLayout, stitch_outputs
from o2n_edge.profiles import EncoderSpec

STAGES = (1, 2, 3, 4)  # every stage a setting may take patch features from
ENCODE_BATCH = 8


@dataclass
class TrunkFeatures:
    """Per-tile stage maps and per-image global features of a set of images at one encoder setting."""

    layout: TileLayout
    stages: dict  # stage -> torch.Tensor (N*tiles, C, h, w) float32
    global_: np.ndarray  # (N, G) merged over tiles

    def __len__(self) -> int:
        return int(self.global_.shape[0])

    def compose(self, layers: tuple[int, ...], kernel: int, index: np.ndarray | slice | None = None) -> dict[str, np.ndarray]:
        """{"patch": (n,H,W,D), "global": (n,G)} for images ``index``, as the exported graph gives them."""
        import torch

        from o2n_edge.encoders.efficientnet import compose_patch

        idx = np.arange(len(self))[index if index is not None else slice(None)]
        rows = (idx[:, None] * self.layout.count + np.arange(self.layout.count)[None, :]).reshape(-1)
        rows_t = torch.from_numpy(rows)
        with torch.inference_mode():
            maps = {i: self.stages[i].index_select(0, rows_t) for i in layers}
            patch = compose_patch(maps, tuple(layers), kernel).numpy()
        out = stitch_outputs({"patch": patch}, self.layout)
        return {"patch": out["patch"], "global": self.global_[idx]}


def trunk_spec(spec: EncoderSpec) -> EncoderSpec:
    """The spec whose trunk pass serves every (layers, kernel) of ``spec``'s network and resolution."""
    return replace(spec, layers=(), aggregation=1)


def encode_trunk(spec: EncoderSpec, images: list[np.ndarray], stages: tuple[int, ...] = STAGES,
                 encoder=None, progress: str | None = None) -> TrunkFeatures:
    """Run the backbone of ``spec`` over ``images`` (uint8, any size) once; keep the stage maps."""
    import torch

    from o2n_edge.encoders import build_encoder
    from o2n_edge.progress import progress_iter

    enc = encoder if encoder is not None else build_encoder(trunk_spec(spec))
    layout = enc.layout
    chunks: dict[int, list] = {i: [] for i in stages}
    globs = []
    with torch.inference_mode():
        starts = range(0, len(images), ENCODE_BATCH)
        for s in progress_iter(starts, progress or "", enabled=progress is not None):
            pixels = enc.preprocess(images[s:s + ENCODE_BATCH])
            feats, head = enc.stage_maps(pixels, stages)
            for i in stages:
                chunks[i].append(feats[i].float().clone())
            globs.append(head.mean(dim=(2, 3)).float().numpy())
    glob = stitch_outputs({"global": np.concatenate(globs)}, layout)["global"]
    return TrunkFeatures(layout, {i: torch.cat(v) for i, v in chunks.items()}, glob)
