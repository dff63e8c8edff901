"""Greedy k-center coreset of the memory bank (PatchCore's subsampling).

The bank grows with shots x augmented views x patches (and the generated pool); the runtime's
nearest-neighbour search costs one GEMM against it, so a bounded bank is a bounded latency. The
greedy k-center choice keeps the bank's coverage: every dropped patch is close to a kept one.
"""

from __future__ import annotations

import numpy as np

from o2n_edge._lazy import require

PROJECTION_DIM = 128  # random projection for the distance computations (Johnson-Lindenstrauss)


def greedy_coreset(bank: np.ndarray, ratio: float, seed: int = 0, max_rows: int | None = None) -> np.ndarray:
    """Indices of a k-center coreset holding ``ratio`` of the rows (at most ``max_rows``)."""
    torch = require("torch", "coreset subsampling")
    assert 0.0 < ratio <= 1.0, f"coreset ratio must be in (0, 1], got {ratio}"
    n = bank.shape[0]
    k = max(1, int(round(n * ratio)))
    if max_rows is not None:
        k = min(k, max_rows)
    if k >= n:
        return np.arange(n)
    g = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(bank, dtype=np.float32))
    if x.shape[1] > PROJECTION_DIM:
        proj = torch.randn(x.shape[1], PROJECTION_DIM, generator=g) / PROJECTION_DIM**0.5
        x = x @ proj
    chosen = [int(torch.randint(n, (1,), generator=g))]
    mind = torch.cdist(x, x[chosen[-1]][None]).squeeze(1)
    for _ in range(k - 1):
        nxt = int(mind.argmax())
        chosen.append(nxt)
        mind = torch.minimum(mind, torch.cdist(x, x[nxt][None]).squeeze(1))
    return np.array(sorted(chosen))
