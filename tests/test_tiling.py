"""Overlapping tiles: layout arithmetic, split/stitch round trip, and the encoder path through them."""

from __future__ import annotations

import numpy as np
import pytest

from o2n_edge.data.tiling import (
    CELL_MULTIPLE,
    merge_globals,
    split_tiles,
    stitch_grids,
    tile_layout,
)


def test_layout_steps_are_cell_multiples() -> None:
    lay = tile_layout(224, 2, 0.25)
    assert lay.step % CELL_MULTIPLE == 0 and lay.step == 160 and lay.side == 384 and lay.count == 4
    assert tile_layout(224, 1).side == 224
    with pytest.raises(ValueError, match="tiles"):
        tile_layout(224, 9)
    with pytest.raises(ValueError, match="overlap"):
        tile_layout(224, 2, 1.0)


def test_split_then_stitch_recovers_a_cellwise_image() -> None:
    """Tiles of an image whose 'features' are its cells stitch back to exactly that image."""
    lay = tile_layout(64, 3, 0.5)  # step 32, side 128
    cell = 8
    rng = np.random.default_rng(0)
    grid = rng.normal(size=(2, lay.side // cell, lay.side // cell, 5)).astype(np.float32)
    pixels = np.repeat(np.repeat(grid, cell, axis=1), cell, axis=2).transpose(0, 3, 1, 2)
    tiles = split_tiles(np.ascontiguousarray(pixels), lay)
    assert tiles.shape == (2 * 9, 5, 64, 64)
    tile_grids = tiles[:, :, ::cell, ::cell].transpose(0, 2, 3, 1)  # each tile's own cells
    np.testing.assert_allclose(stitch_grids(np.ascontiguousarray(tile_grids), lay), grid, rtol=1e-6)
    glob = np.arange(18, dtype=np.float32).reshape(18, 1)
    np.testing.assert_allclose(merge_globals(glob, lay)[:, 0], [4.0, 13.0])


def test_overlaps_are_averaged() -> None:
    lay = tile_layout(64, 2, 0.5)  # step 32, side 96, 8-px cells: 8x8 tiles in a 12x12 grid
    grids = np.stack([np.full((8, 8, 1), float(k)) for k in range(4)]).astype(np.float32)
    out = stitch_grids(grids, lay)[0, :, :, 0]
    assert out[0, 0] == 0 and out[0, 11] == 1 and out[11, 0] == 2 and out[11, 11] == 3
    assert out[5, 5] == pytest.approx(1.5)  # all four tiles overlap in the middle


def test_jpeg_draft_decode_reduces_and_stays_close(shared_data) -> None:
    """A 512-px JPEG wanted at 224 decodes at 1/2 (256 px), close to the full decode resized."""
    from o2n_edge.data import load_image
    from o2n_edge.data.images import decode_image

    path = sorted((shared_data / "hazelnut_toy" / "hazelnut" / "train" / "good").glob("*.jpg"))[0]
    assert decode_image(path.read_bytes(), "x", draft_size=224).shape == (256, 256, 3)
    assert decode_image(path.read_bytes(), "x", draft_size=300).shape == (512, 512, 3)  # 256 < 300
    full, draft = load_image(path, 224), load_image(path, 224, draft=True)
    assert draft.shape == full.shape
    assert np.abs(full.astype(int) - draft.astype(int)).mean() < 2.0
