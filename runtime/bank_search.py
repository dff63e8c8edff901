"""Nearest memory-bank row for each query patch, on the pipeline's execution provider.

Why: with a few-shot bank of tens of thousands of rows the search is one large matrix product,
the biggest piece of scoring. numpy runs it on its BLAS (the pipeline's choice on the CPU: twice
the speed of the graph below on a 7.5k-row bank, docs/decisions/latency.md); ONNX
Runtime runs the shipped
``static/bank_search.onnx`` graph (MatMul + ArgMin, written by
``o2n_edge.export.bank_search_graph``) with MLAS on the CPU or cuBLAS on a GPU, where the bank is
bound once as a device tensor instead of being copied per image.

Both searches return indices only: ``runtime.scoring.knn_distance`` recomputes the chosen row's
distance exactly in float64, so the score does not depend on which search found the row.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

GRAPH_PATH = Path(__file__).resolve().parent / "static" / "bank_search.onnx"
INT8_GRAPH_PATH = GRAPH_PATH.with_name("bank_search_int8.onnx")
INT8_CHUNK = 128  # query rows per call: the int32 products of a chunk stay in cache for the TopK
# Rows the int8 product proposes per query, re-ranked in float32: on tire's features the exact
# nearest row is among 4 for 99.97% of patches, among 1 for 92% (benchmarks/results/int8_search.md)
INT8_CANDIDATES = 4
QUERY_LEVELS = 127  # queries in [-127, 127] (uint8 with zero point 128)
BANK_LEVELS = 63  # bank values in [-63, 63]: u8 x s8 pair sums fit int16 (see Int8BankSearch)

NearestSearch = Callable[[np.ndarray], np.ndarray]
"""float32 (N, D) query rows -> int64 (N,) index of the nearest bank row."""


def augmented_bank(bank: np.ndarray) -> np.ndarray:
    """(D+1, M) float32 ``[-2 b, |b|^2]^T``: ``[q, 1] @ it`` is the squared distance less ``|q|^2``."""
    b32 = bank.astype(np.float32, copy=False)
    sq = np.einsum("ij,ij->i", b32, b32)
    return np.ascontiguousarray(np.concatenate([-2.0 * b32, sq[:, None]], axis=1).T)


def augmented_queries(queries: np.ndarray) -> np.ndarray:
    q = queries.astype(np.float32, copy=False)
    return np.concatenate([q, np.ones((len(q), 1), dtype=np.float32)], axis=1)


class NumpyBankSearch:
    """The search with numpy's BLAS: no session, works everywhere (the reference for the graph)."""

    name = "numpy"

    def __init__(self, bank: np.ndarray) -> None:
        self.bank_t = augmented_bank(bank)

    def __call__(self, queries: np.ndarray) -> np.ndarray:
        return np.argmin(augmented_queries(queries) @ self.bank_t, axis=1)


class OrtBankSearch:
    """The search as the shipped ONNX graph on an onnxruntime session.

    ``make_session(path)`` builds the session with the pipeline's options, so the search runs
    with the same provider and thread settings as the models. On a CUDA provider the bank is
    uploaded once and bound on every call (IO binding); on the CPU numpy arrays are passed as
    they are (onnxruntime reads them without a copy).
    """

    name = "onnxruntime"

    def __init__(self, bank: np.ndarray, make_session: Callable[[Path], Any], bind_bank: bool | None = None) -> None:
        """``bind_bank``: keep the bank in an OrtValue bound per call; default: only on CUDA."""
        self.bank_t = augmented_bank(bank)
        self.session = make_session(GRAPH_PATH)
        self.provider = self.session.get_providers()[0]
        on_gpu = self.provider == "CUDAExecutionProvider"
        self._bank_on_device = None
        if on_gpu if bind_bank is None else bind_bank:
            import onnxruntime as ort

            device = "cuda" if on_gpu else "cpu"
            self._bank_on_device = ort.OrtValue.ortvalue_from_numpy(self.bank_t, device, 0)

    def __call__(self, queries: np.ndarray) -> np.ndarray:
        q = augmented_queries(queries)
        if self._bank_on_device is None:
            return self.session.run(None, {"queries": q, "bank_t": self.bank_t})[0]
        binding = self.session.io_binding()
        binding.bind_cpu_input("queries", q)
        binding.bind_ortvalue_input("bank_t", self._bank_on_device)
        binding.bind_output("nearest")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]


class Int8BankSearch:
    """The nearest row found by an int8 product (onnxruntime's MatMulInteger, CPU), re-ranked in float32.

    Why: on a CPU thread the exact float32 search of a 448-px image (3,136 patches against an
    8k-row bank) is most of the per-image time; the same product in int8 runs on the integer
    dot-product units. It proposes each query's ``INT8_CANDIDATES`` best rows, and the nearest of
    them in float32 is the answer (measured in ``benchmarks/results/latency_lite_v5.md``). The
    distance to it is computed exactly (``runtime.scoring.knn_distance``), so a miss can only
    raise a distance, never lower it.

    The quantized product is ``Q . B - H``: queries ``Q = round(q / sq)`` in [-127, 127], bank
    ``B = round(b / sb)`` in [-63, 63], and each row's ``H = |b|^2 / (2 sq sb)`` spread over a few
    extra bank columns: coarse ones against a constant query column of 127, one fine column
    against a constant 1, so ``H`` is carried to half a unit. Its largest values mark the nearest
    rows of ``|q - b|^2 = |q|^2 - 2 sq sb (Q . B - H)``. Every bank value stays within 63 so that
    a pair of u8 x s8 products never overflows 16 bits: CPUs without VNNI (AVX2) add pairs in
    int16, and the product is then exact there too. Both scales come from the bank's largest
    magnitude, so every place that loads the bank quantizes it alike and no bundle carries int8 data.
    """

    name = "onnxruntime int8"

    def __init__(self, bank: np.ndarray, threads: int = 0) -> None:
        from o2n_edge._lazy import require

        ort = require("onnxruntime", "the int8 bank search")
        b = np.asarray(bank, dtype=np.float64)
        top = float(np.abs(b).max()) or 1.0
        self.query_scale = top / QUERY_LEVELS
        bank_scale = top / BANK_LEVELS
        quantized = np.clip(np.round(b / bank_scale), -BANK_LEVELS, BANK_LEVELS)
        rest = -(b * b).sum(axis=1) / (2.0 * self.query_scale * bank_scale)  # -H
        coarse = int(np.ceil(-rest.min(initial=0.0) / (QUERY_LEVELS * BANK_LEVELS))) + 1
        extra = np.zeros((len(b), coarse + 1))
        for c in range(coarse):
            extra[:, c] = np.clip(np.round(rest / QUERY_LEVELS), -BANK_LEVELS, BANK_LEVELS)
            rest -= QUERY_LEVELS * extra[:, c]
        extra[:, coarse] = np.clip(np.round(rest), -BANK_LEVELS, BANK_LEVELS)
        # the query's constant columns, as uint8 with zero point 128: 127 per coarse column, 1 fine
        self.constants = np.array([128 + QUERY_LEVELS] * coarse + [129], dtype=np.uint8)
        self.bank_q = np.ascontiguousarray(np.concatenate([quantized, extra], axis=1).T.astype(np.int8))
        self.bank = np.ascontiguousarray(bank, dtype=np.float32)  # for the float32 re-rank
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        self._bank_value = ort.OrtValue.ortvalue_from_numpy(self.bank_q)  # must outlive the session
        options.add_initializer("bank_q", self._bank_value)
        self.session = ort.InferenceSession(str(INT8_GRAPH_PATH), sess_options=options,
                                            providers=["CPUExecutionProvider"])

    def quantize(self, queries: np.ndarray) -> np.ndarray:
        """(N, D) float queries -> (N, D + constant columns) uint8 rows (zero point 128)."""
        q = np.clip(np.round(np.asarray(queries, dtype=np.float32) / np.float32(self.query_scale)),
                    -QUERY_LEVELS, QUERY_LEVELS)
        out = np.empty((len(q), q.shape[1] + len(self.constants)), dtype=np.uint8)
        out[:, : q.shape[1]] = (q + 128).astype(np.uint8)
        out[:, q.shape[1]:] = self.constants
        return out

    def candidates(self, queries: np.ndarray) -> np.ndarray:
        """(N, k) int64: each query's best rows by the int8 product, best first."""
        rows = self.quantize(queries)
        k = np.array([min(INT8_CANDIDATES, self.bank.shape[0])], dtype=np.int64)
        if not len(rows):
            return np.zeros((0, int(k[0])), dtype=np.int64)
        parts = [self.session.run(None, {"queries_q": rows[i:i + INT8_CHUNK], "k": k})[0]
                 for i in range(0, len(rows), INT8_CHUNK)]
        return np.concatenate(parts).astype(np.int64, copy=False)

    def __call__(self, queries: np.ndarray) -> np.ndarray:
        cand = self.candidates(queries)
        q = np.asarray(queries, dtype=np.float32)
        diff = q[:, None, :] - self.bank[cand]
        best = np.einsum("nkd,nkd->nk", diff, diff).argmin(axis=1)
        return cand[np.arange(len(cand)), best]


def principal_axes(bank: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), basis (D, dims)) of the bank's first ``dims`` principal axes, in float64.

    Computed from the bank itself wherever the bank is loaded (eval, export, the device), so no
    bundle carries it and every place searches the same subspace.
    """
    b = np.asarray(bank, dtype=np.float64)
    mean = b.mean(axis=0)
    _, _, vt = np.linalg.svd(b - mean, full_matrices=False)
    basis = vt[:dims].T
    # SVD signs are arbitrary; fix them so the projection is reproducible bit for bit
    basis *= np.where(basis[np.abs(basis).argmax(axis=0), np.arange(basis.shape[1])] < 0, -1.0, 1.0)
    return mean, basis


class ProjectedSearch:
    """The nearest row searched in the bank's first ``dims`` principal axes.

    Why: the search is a (queries x rows x dim) product; patch features of a few good images
    lie close to a low-dimensional subspace, so a reduced dimension finds the same row for almost
    every query at a fraction of the work. It only picks the row: the distance to it is still
    computed exactly in every dimension (``runtime.scoring.knn_distance``), so a miss can only
    raise a distance, never lower it.
    """

    def __init__(self, bank: np.ndarray, dims: int, make_search: Callable[[np.ndarray], NearestSearch]) -> None:
        self.mean, basis = principal_axes(bank, dims)
        self.basis = basis.astype(np.float32)
        self.mean32 = self.mean.astype(np.float32)
        self.inner = make_search(self.project(bank))
        self.name = f"{getattr(self.inner, 'name', 'search')} in {dims} principal dims"

    def project(self, rows: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray((rows.astype(np.float32, copy=False) - self.mean32) @ self.basis)

    def __call__(self, queries: np.ndarray) -> np.ndarray:
        return self.inner(self.project(queries))


__all__ = ["GRAPH_PATH", "INT8_CANDIDATES", "INT8_GRAPH_PATH", "Int8BankSearch", "NearestSearch", "NumpyBankSearch",
           "OrtBankSearch", "ProjectedSearch", "augmented_bank", "principal_axes"]
