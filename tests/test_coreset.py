"""The numpy greedy k-center coreset: the k-center property, determinism, sizes and a reference.

Why: the coreset decides which good patches a bundle remembers; a wrong pick is invisible in
the code and shows only as lost detections, so its defining property is checked directly.
"""

from __future__ import annotations

import numpy as np
import pytest

from o2n_edge.runtime.coreset import (
    PROJECTION_DIM,
    StreamingCoreset,
    coreset_size,
    greedy_coreset,
    projected,
    selection_start,
)


def _bank(n: int, dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def _dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return np.sqrt(((a64[:, None, :] - b64[None, :, :]) ** 2).sum(-1))


def reference_greedy(bank: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The textbook loop in float64, on the same projection and first row."""
    proj, first = selection_start(len(bank), bank.shape[1], seed)
    x = projected(bank, proj).astype(np.float64)
    chosen = [first]
    mind = np.linalg.norm(x - x[chosen[0]], axis=1)
    for _ in range(k - 1):
        mind[chosen] = -1.0
        chosen.append(int(mind.argmax()))
        mind = np.minimum(mind, np.linalg.norm(x - x[chosen[-1]], axis=1))
    return np.array(sorted(chosen))


def test_k_center_property() -> None:
    """Every dropped row lies within the covering radius, and that radius is no more than the
    smallest distance between two kept rows (what makes greedy a 2-approximation)."""
    bank = _bank(400, 16)
    idx = greedy_coreset(bank, 0.1, seed=3)
    assert len(idx) == 40 and np.all(np.diff(idx) > 0)
    kept = bank[idx]
    dropped = np.delete(bank, idx, axis=0)
    radius = _dists(dropped, kept).min(1).max()
    pair = _dists(kept, kept)
    np.fill_diagonal(pair, np.inf)
    assert radius <= pair.min() + 1e-5


def test_agrees_with_reference_implementation() -> None:
    bank = _bank(300, PROJECTION_DIM + 24, seed=1)  # wider than the projection: projected first
    for seed in (0, 5):
        np.testing.assert_array_equal(greedy_coreset(bank, 0.2, seed=seed), reference_greedy(bank, 60, seed))


def test_deterministic_by_seed() -> None:
    bank = _bank(500, 200, seed=2)
    a, b = greedy_coreset(bank, 0.1, seed=0), greedy_coreset(bank, 0.1, seed=0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, greedy_coreset(bank, 0.1, seed=1))


def test_max_rows_ratio_one_and_tiny_banks() -> None:
    bank = _bank(200, 8)
    assert len(greedy_coreset(bank, 0.5, max_rows=30)) == 30
    assert len(greedy_coreset(bank, 0.1, max_rows=500)) == 20
    np.testing.assert_array_equal(greedy_coreset(bank, 1.0), np.arange(200))
    np.testing.assert_array_equal(greedy_coreset(bank[:1], 0.1), [0])
    assert len(greedy_coreset(bank[:3], 0.1)) == 1  # at least one row
    dup = np.repeat(bank[:2], 5, axis=0)  # duplicates: still distinct indices
    assert len(set(greedy_coreset(dup, 0.5).tolist())) == 5
    with pytest.raises(ValueError):
        greedy_coreset(bank, 0.0)
    assert coreset_size(75_264, 0.1, 8192) == 7526 and coreset_size(150_528, 0.1, 8192) == 8192


def test_streaming_keeps_the_budget_and_covers_every_block() -> None:
    """Per-image coresets then a greedy over their union: the row budget holds, the rows are
    real bank rows, and an outlier block is represented."""
    blocks = [_bank(300, 24, seed=s) for s in range(6)]
    blocks[4] = blocks[4] + 50.0  # one image far from the others
    stream = StreamingCoreset(n_blocks=6, ratio=0.1, max_rows=100, seed=0)
    for b in blocks:
        stream.add(b)
    rows = stream.rows()
    assert rows.shape == (100, 24) and stream.rows_seen == 1800
    allrows = np.concatenate(blocks)
    assert _dists(rows, allrows).min(1).max() < 1e-5  # every kept row is a bank row
    assert (rows.mean(1) > 25).sum() >= 1
    again = StreamingCoreset(n_blocks=6, ratio=0.1, max_rows=100, seed=0)
    for b in blocks:
        again.add(b)
    np.testing.assert_array_equal(rows, again.rows())


def test_draws_the_projection_and_first_row_torch_drew() -> None:
    """The replaced torch coreset's seeded draws, reproduced without torch (skipped without it)."""
    torch = pytest.importorskip("torch")
    for dim, seed in ((152, 0), (152, 3), (130, 1)):
        g = torch.Generator().manual_seed(seed)
        want = torch.randn(dim, PROJECTION_DIM, generator=g) / PROJECTION_DIM**0.5
        first = int(torch.randint(75_264, (1,), generator=g))
        proj, got_first = selection_start(75_264, dim, seed)
        assert got_first == first
        np.testing.assert_allclose(proj, want.numpy(), rtol=0, atol=1e-6)
    g = torch.Generator().manual_seed(2)
    assert selection_start(1000, 64, 2) == (None, int(torch.randint(1000, (1,), generator=g)))
