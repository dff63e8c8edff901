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


__all__ = ["GRAPH_PATH", "NearestSearch", "NumpyBankSearch", "OrtBankSearch", "ProjectedSearch", "augmented_bank",
           "principal_axes"]
