"""Greedy k-center coreset of the memory bank (PatchCore's subsampling), numpy only.

Why: the runtime's nearest-neighbour search is one GEMM against the bank, so a bounded bank is a
bounded per-image time; the greedy k-center choice keeps the bank's coverage (every dropped patch
is close to a kept one). Why here and torch-free: a line device rebuilds its bank from new good
images without torch, and the offline ``eval``/``export`` use the same code, so a bundle's bank is
the one its eval scored with.

Why it is fast: the squared norms are computed once, and each kept row costs at most one float32
mat-vec ``|x|^2 - 2 x.c + |c|^2`` into a preallocated buffer (fewer rows once the triangle
inequality rules the others out, see :func:`greedy_on`); distances
are taken on a seeded random projection to ``PROJECTION_DIM`` dimensions (Johnson-Lindenstrauss),
drawn as the torch implementation this replaces drew it, so the same rows are kept.
A bank too big for one greedy pass (hundreds of good images) goes through
:class:`StreamingCoreset`: a k-center coreset per image, then one greedy pass over their union, so
the features of every image never have to be held at once.
"""

from __future__ import annotations

import math

import numpy as np

PROJECTION_DIM = 128  # random projection for the distance computations
# Banks up to this many rows take the exact greedy; bigger streams use the per-image stage.
# 4 shots x 6 views x 3,136 patches at 448 px = 75,264 rows stay exact.
EXACT_MAX_ROWS = 100_000
# Per-image stage: each image keeps OVERSAMPLE x its even share of the final rows, so the final
# greedy still chooses where the coverage is needed instead of taking every image's share.
OVERSAMPLE = 4
# Greedy step: with more than 1/PRUNE_FULL_FRACTION of the rows to recompute, one mat-vec over
# all rows is cheaper than gathering them (measured on a 448-px bank: 1/4 beat 1/2 and 1/8).
PRUNE_FULL_FRACTION = 4


def coreset_size(n: int, ratio: float, max_rows: int | None = None) -> int:
    """Rows kept from ``n``: ``round(n * ratio)`` (at least 1), at most ``max_rows``, at most ``n``."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    k = max(1, int(round(n * ratio)))
    if max_rows is not None:
        k = min(k, int(max_rows))
    return min(k, n)


def _torch_stream(seed: int) -> np.random.MT19937:
    """The Mersenne Twister as ``torch.Generator().manual_seed(seed)`` seeds it (same 32-bit outputs)."""
    _, key, pos = np.random.RandomState(int(seed)).get_state()[:3]  # the classic init_genrand(seed)
    bits = np.random.MT19937()
    bits.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": pos}}
    return bits


def _uniforms(bits: np.random.MT19937, n: int) -> np.ndarray:
    """torch's float32 uniform [0, 1): the low 24 bits of each 32-bit output."""
    raw = bits.random_raw(n).astype(np.uint32)
    return (raw & np.uint32((1 << 24) - 1)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def _box_muller_16(u: np.ndarray) -> np.ndarray:
    """torch's normal fill: each group of 16 uniforms becomes 16 normals (Box-Muller, in halves)."""
    g = u.reshape(-1, 16)
    radius = np.sqrt(np.float32(-2.0) * np.log(np.float32(1.0) - g[:, :8]))
    theta = np.float32(2.0 * math.pi) * g[:, 8:]
    return np.concatenate([radius * np.cos(theta), radius * np.sin(theta)], axis=1).reshape(-1)


def _randn(bits: np.random.MT19937, size: int) -> np.ndarray:
    """``torch.randn(size, generator=g)`` (size >= 16) to float32 rounding, from the same stream."""
    u = _uniforms(bits, size)
    out = np.empty(size, dtype=np.float32)
    whole = size // 16 * 16
    out[:whole] = _box_muller_16(u[:whole])
    if size % 16:  # torch redraws the last 16 values
        out[size - 16:] = _box_muller_16(_uniforms(bits, 16))
    return out


def selection_start(n: int, dim: int, seed: int, out_dim: int = PROJECTION_DIM) -> tuple[np.ndarray | None, int]:
    """The seeded (dim, out_dim) Gaussian projection (None when ``dim <= out_dim``) and first row.

    Why torch's stream without torch: the coreset used to be drawn with ``torch.Generator``; this
    reproduces its draws (the projection to float32 rounding, the first row exactly), so a bank
    keeps the rows it kept before (measured: a numpy-drawn projection moved tire's image AUROC
    by up to 2.7 points at 224 px, as much as another seed).
    """
    bits = _torch_stream(seed)
    proj = None
    if dim > out_dim:
        proj = _randn(bits, dim * out_dim).reshape(dim, out_dim) / np.float32(math.sqrt(out_dim))
    first = int(bits.random_raw(1)[0]) % n  # torch.randint(n, (1,)): one 32-bit output mod n
    return proj, first


def projected(bank: np.ndarray, proj: np.ndarray | None) -> np.ndarray:
    """Contiguous float32 rows the greedy measures distances on."""
    x = np.ascontiguousarray(bank, dtype=np.float32)
    return x if proj is None else np.ascontiguousarray(x @ proj)


def greedy_on(x: np.ndarray, k: int, first: int) -> np.ndarray:
    """Greedy k-center on float32 rows ``x`` from row ``first``: the ``k`` kept indices in pick order.

    Each step keeps the row farthest from everything kept so far, then lowers every row's
    distance-to-the-kept with one mat-vec against the new row. Why the pruning: once a row's
    nearest kept row ``a`` is at distance ``r``, a new kept row ``c`` with ``|a - c| >= 2 r``
    cannot come closer (triangle inequality), so only rows whose ``a`` is near ``c`` are
    recomputed, from a mat-vec over the kept rows; late in the greedy that is a few percent of the
    bank (about 2x faster on a 4-shot 448-px bank, the same picks). Kept rows are excluded
    explicitly, so duplicate rows never make it keep a row twice.
    """
    n = x.shape[0]
    k = min(int(k), n)
    sq = np.einsum("ij,ij->i", x, x)
    mind = np.full(n, np.inf, dtype=np.float32)  # squared distance to the nearest kept row
    near = np.zeros(n, dtype=np.int32)  # which kept row (pick number) that is
    kept_x = np.empty((k, x.shape[1]), dtype=np.float32)
    kept_sq = np.empty(k, dtype=np.float32)
    buf = np.empty(n, dtype=np.float32)
    chosen = np.empty(k, dtype=np.int64)
    c = int(first)
    for j in range(k):
        chosen[j] = c
        xc = x[c]
        cand = None
        if j > 0:  # squared distances kept row -> c; a row can only improve if that is < 4 r^2
            between = kept_sq[:j] - np.float32(2.0) * (kept_x[:j] @ xc) + sq[c]
            cand = np.flatnonzero(between[near] < np.float32(4.0) * mind)
            if len(cand) > n // PRUNE_FULL_FRACTION:
                cand = None
        kept_x[j], kept_sq[j] = xc, sq[c]
        if cand is None:
            np.dot(x, xc, out=buf)
            buf *= np.float32(-2.0)
            buf += sq
            buf += sq[c]
            closer = np.flatnonzero(buf < mind)
            mind[closer] = buf[closer]
        else:
            d = x[cand] @ xc
            d *= np.float32(-2.0)
            d += sq[cand]
            d += sq[c]
            hit = d < mind[cand]
            closer = cand[hit]
            mind[closer] = d[hit]
        near[closer] = j
        mind[c] = -np.inf
        if j + 1 < k:
            c = int(mind.argmax())
    return chosen


def greedy_coreset(bank: np.ndarray, ratio: float, seed: int = 0, max_rows: int | None = None) -> np.ndarray:
    """Sorted indices of a k-center coreset holding ``ratio`` of the rows (at most ``max_rows``).

    Exact greedy on the seeded projection; the same (bank, ratio, seed, max_rows) always gives
    the same rows.
    """
    n = int(bank.shape[0])
    k = coreset_size(n, ratio, max_rows)
    if k >= n:
        return np.arange(n)
    proj, first = selection_start(n, int(bank.shape[1]), seed)
    return np.sort(greedy_on(projected(bank, proj), k, first))


class StreamingCoreset:
    """Coreset of a bank that arrives one image (block of rows) at a time.

    Why: 200 good images at 448 px are ~3.8M patch rows (2.3 GB of features) and one greedy pass
    over them would run for hours. Each block is cut to its own k-center coreset of
    ``OVERSAMPLE`` x its share of the final rows as it arrives; :meth:`rows` runs the greedy over
    the union. The coverage bound of the union is that of the two greedy passes combined (a
    k-center coreset of k-center coresets), measured against the exact greedy in
    ``benchmarks/bank_build.py``.
    """

    def __init__(self, n_blocks: int, ratio: float, max_rows: int | None, seed: int = 0) -> None:
        if n_blocks < 1:
            raise ValueError(f"n_blocks must be at least 1, got {n_blocks}")
        coreset_size(1, ratio, max_rows)  # validates ratio and max_rows
        self.n_blocks, self.ratio, self.max_rows, self.seed = int(n_blocks), float(ratio), max_rows, int(seed)
        self._rng = np.random.default_rng([self.seed, 1])
        self._proj: np.ndarray | None = None
        self._dim: int | None = None
        self._k_final = self._per_block = 0
        self._kept: list[np.ndarray] = []
        self._kept_x: list[np.ndarray] = []
        self.rows_seen = 0

    def add(self, block: np.ndarray) -> None:
        """Cut one image's rows (N, D) to its per-image coreset and keep them."""
        block = np.ascontiguousarray(block, dtype=np.float32).reshape(-1, block.shape[-1])
        if self._dim is None:
            self._dim = int(block.shape[1])
            self._proj = selection_start(1, self._dim, self.seed)[0]
            self._k_final = coreset_size(block.shape[0] * self.n_blocks, self.ratio, self.max_rows)
            self._per_block = max(1, math.ceil(OVERSAMPLE * self._k_final / self.n_blocks))
        elif block.shape[1] != self._dim:
            raise ValueError(f"block has {block.shape[1]} columns, earlier blocks {self._dim}")
        self.rows_seen += int(block.shape[0])
        x = projected(block, self._proj)
        if self._per_block < block.shape[0]:
            idx = greedy_on(x, self._per_block, int(self._rng.integers(block.shape[0])))
            block, x = block[idx], x[idx]
        self._kept.append(block)
        self._kept_x.append(x)

    def rows(self) -> np.ndarray:
        """The final bank (float32 rows): greedy k-center over the union of the per-image coresets."""
        if not self._kept:
            raise ValueError("no blocks were added")
        union = np.concatenate(self._kept)
        k = min(coreset_size(self.rows_seen, self.ratio, self.max_rows), union.shape[0])
        if k >= union.shape[0]:
            return union
        x = np.concatenate(self._kept_x)
        return union[np.sort(greedy_on(x, k, int(self._rng.integers(union.shape[0]))))]
