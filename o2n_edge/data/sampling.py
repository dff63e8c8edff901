"""Seeded k-shot selection from the training good images.

Few-shot results swing with *which* images are the shots, so every result names its seed and
the same (list, k, seed) always gives the same shots. The shots are the first k of one seeded
permutation, so they are nested: the 1-shot image is among the 2-shot images, and so on, which
makes a 1/2/4/8-shot table a curve over growing evidence rather than over unrelated draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

# A shot count meaning every training good image (``eval --shots all``): the most a user can
# give; its cost is bounded by the bank's row budget (``Profile.bank_max_rows``), not by the
# number of images. Resolved by :func:`shot_count`; ``sample_shots`` itself still refuses 0.
ALL_SHOTS = 0


def shot_count(k: int, available: int) -> int:
    """``k``, or every available image for ``ALL_SHOTS``."""
    return available if k == ALL_SHOTS else k


def sample_shots(train_good: Sequence[Path], k: int, seed: int) -> list[Path]:
    """Draw ``k`` distinct training good images with ``seed`` (nested across k for one seed)."""
    n = len(train_good)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an integer number of shots, got {k!r}")
    if not 1 <= k <= n:
        raise ValueError(
            f"k={k} shots requested but {n} training good images are available (k must be 1..{n})"
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    order = np.random.default_rng(int(seed)).permutation(n)
    return [train_good[int(i)] for i in order[:k]]
