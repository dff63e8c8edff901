"""Overlapping tiles: score a large image at the encoder's native resolution, stitch the grid back.

An image is resized to ``side = tile + (tiles - 1) * step`` and cut into ``tiles x tiles`` squares
of the encoder's input size; the tiles go through the encoder graph as one batch, and their patch
grids are laid back at their offsets, overlapping cells averaged. The step is a multiple of
:data:`CELL_MULTIPLE` pixels (the coarsest feature stride), so every tile's grid lands on whole
cells of the stitched grid. numpy only: the torch reference and the runtime share it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CELL_MULTIPLE = 32  # tile steps are multiples of this (every feature stride divides it)
MAX_TILES = 4  # per side


@dataclass(frozen=True)
class TileLayout:
    """Where the tiles of one image sit: ``tiles`` per side, ``step`` pixels apart."""

    tile: int
    tiles: int = 1
    step: int = 0

    @property
    def side(self) -> int:
        """Side of the square the image is resized to before it is cut."""
        return self.tile + (self.tiles - 1) * self.step

    @property
    def count(self) -> int:
        return self.tiles * self.tiles

    def offsets(self) -> list[tuple[int, int]]:
        """(y, x) pixel offsets of the tiles, row-major (the batch order of :func:`split_tiles`)."""
        return [(i * self.step, j * self.step) for i in range(self.tiles) for j in range(self.tiles)]

    def to_dict(self) -> dict[str, int]:
        return {"tile": self.tile, "tiles": self.tiles, "step": self.step, "side": self.side}


def tile_layout(tile: int, tiles: int = 1, overlap: float = 0.25) -> TileLayout:
    """The layout of ``tiles`` x ``tiles`` tiles of side ``tile`` overlapping by ~``overlap``."""
    if not 1 <= int(tiles) <= MAX_TILES:
        raise ValueError(f"tiles must be 1..{MAX_TILES} per side, got {tiles}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"tile overlap must be in [0, 1), got {overlap}")
    if int(tiles) == 1:
        return TileLayout(int(tile), 1, 0)
    step = max(CELL_MULTIPLE, int(round(tile * (1.0 - overlap) / CELL_MULTIPLE)) * CELL_MULTIPLE)
    return TileLayout(int(tile), int(tiles), min(step, int(tile)))


def split_tiles(pixels: np.ndarray, layout: TileLayout) -> np.ndarray:
    """(B,C,side,side) -> (B*count,C,tile,tile), tiles of one image contiguous, row-major."""
    b, c, h, w = pixels.shape
    assert h == w == layout.side, f"expected {layout.side}px inputs, got {h}x{w}"
    if layout.tiles == 1:
        return pixels
    t = layout.tile
    out = np.stack([pixels[:, :, y:y + t, x:x + t] for y, x in layout.offsets()], axis=1)
    return np.ascontiguousarray(out.reshape(b * layout.count, c, t, t))


def stitch_grids(patch: np.ndarray, layout: TileLayout) -> np.ndarray:
    """(B*count,g,g,D) tile grids -> (B,G,G,D) image grid; overlapping cells are averaged."""
    if layout.tiles == 1:
        return patch
    n, g, g2, d = patch.shape
    assert g == g2 and n % layout.count == 0, f"unexpected tile grids {patch.shape}"
    assert layout.tile % g == 0, f"tile {layout.tile} is not a whole number of {g} cells"
    cell = layout.tile // g
    assert layout.step % cell == 0, f"step {layout.step} is not a whole number of {cell}px cells"
    b = n // layout.count
    side = layout.side // cell
    acc = np.zeros((b, side, side, d), dtype=np.float64)
    hits = np.zeros((1, side, side, 1), dtype=np.float64)
    grids = patch.reshape(b, layout.count, g, g, d)
    for k, (y, x) in enumerate(layout.offsets()):
        y0, x0 = y // cell, x // cell
        acc[:, y0:y0 + g, x0:x0 + g] += grids[:, k]
        hits[:, y0:y0 + g, x0:x0 + g] += 1.0
    return (acc / hits).astype(patch.dtype)


def merge_globals(glob: np.ndarray, layout: TileLayout) -> np.ndarray:
    """(B*count,G) per-tile global features -> (B,G), their mean."""
    if layout.tiles == 1:
        return glob
    return glob.reshape(-1, layout.count, glob.shape[-1]).mean(axis=1).astype(glob.dtype)


def stitch_outputs(out: dict[str, np.ndarray], layout: TileLayout) -> dict[str, np.ndarray]:
    """Per-tile encoder outputs -> per-image ones (grids stitched, global features averaged)."""
    return {name: stitch_grids(v, layout) if v.ndim == 4 else merge_globals(v, layout)
            for name, v in out.items()}
