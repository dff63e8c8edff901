"""Greedy k-center coreset of a memory bank in numpy (PatchCore's subsampling, without torch).

Why in the runtime: ``o2n-edge learn`` rebuilds a bundle's bank on the line device, where only
the base install and onnxruntime exist. The greedy k-center choice keeps the bank's coverage:
every dropped patch is close to a kept one. A minimal implementation for the learn command; a
fuller numpy module with the same signature is due to replace it.
"""

from __future__ import annotations

import numpy as np

PROJECTION_DIM = 128  # random projection for the distance computations (Johnson-Lindenstrauss)


def greedy_coreset(bank: np.ndarray, ratio: float, seed: int = 0, max_rows: int | None = None) -> np.ndarray:
    """Sorted indices of a k-center coreset holding ``ratio`` of the rows (at most ``max_rows``)."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
    n = int(bank.shape[0])
    k = max(1, int(round(n * ratio)))
    if max_rows is not None:
        k = min(k, max_rows)
    if k >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    x = np.ascontiguousarray(bank, dtype=np.float32)
    if x.shape[1] > PROJECTION_DIM:
        proj = rng.standard_normal((x.shape[1], PROJECTION_DIM)).astype(np.float32) / np.float32(PROJECTION_DIM**0.5)
        x = x @ proj
    sq = np.einsum("nd,nd->n", x, x)
    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = int(rng.integers(n))
    mind = np.maximum(sq - 2.0 * (x @ x[chosen[0]]) + sq[chosen[0]], 0.0)
    for i in range(1, k):
        nxt = int(mind.argmax())
        chosen[i] = nxt
        np.minimum(mind, np.maximum(sq - 2.0 * (x @ x[nxt]) + sq[nxt], 0.0), out=mind)
    return np.sort(chosen)
