"""The memory-bank search: the shipped ONNX graph, and that every search finds the true nearest row."""

from __future__ import annotations

import numpy as np
import pytest
from o2n_edge.runtime.bank_search import GRAPH_PATH, NumpyBankSearch, OrtBankSearch
from o2n_edge.runtime.scoring import KNN_CHUNK, knn_distance


def _cpu_session(path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def test_shipped_graph_is_what_the_generator_writes() -> None:
    from o2n_edge.export.bank_search_graph import build_bank_search_graph

    assert GRAPH_PATH.read_bytes() == build_bank_search_graph(), (
        "runtime/static/bank_search.onnx is stale: run python -m o2n_edge.export.bank_search_graph")


@pytest.mark.parametrize("n,m,d", [(7, 1, 3), (300, 500, 24), (KNN_CHUNK + 5, 2000, 152)])
@pytest.mark.parametrize("search_kind", ["numpy", "onnxruntime", "onnxruntime-bound"])
def test_search_finds_the_brute_force_nearest_row(n: int, m: int, d: int, search_kind: str) -> None:
    rng = np.random.default_rng(n + m)
    bank = rng.normal(size=(m, d)).astype(np.float32) * 3.0
    queries = (bank[rng.integers(0, m, n)] + rng.normal(scale=0.5, size=(n, d))).astype(np.float32)
    if search_kind == "numpy":
        search = NumpyBankSearch(bank)
    else:  # "bound": the IO-binding path a GPU takes, here with the bank as a CPU OrtValue
        search = OrtBankSearch(bank, _cpu_session, bind_bank=search_kind.endswith("bound"))
        assert (search._bank_on_device is not None) == search_kind.endswith("bound")
    idx = search(queries)
    assert idx.shape == (n,) and idx.dtype == np.int64
    exact = np.sqrt(((queries[:, None, :].astype(np.float64) - bank[None].astype(np.float64)) ** 2).sum(-1))
    # float32 search vs float64 truth: a near-tie may pick the other row, never a farther one
    np.testing.assert_allclose(exact[np.arange(n), idx], exact.min(axis=1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(knn_distance(queries, bank, search), exact.min(axis=1), rtol=1e-5, atol=1e-5)


def test_both_searches_give_the_same_scores() -> None:
    from o2n_edge.runtime.scoring import Reference, Scorer, ScoringConfig

    rng = np.random.default_rng(3)
    bank = rng.normal(size=(400, 16)).astype(np.float32)
    config = ScoringConfig(branches=("pool",), weights={"pool": 1.0}, image_size=28, topk_fraction=0.02,
                           global_weight=0.5, smoothing_sigma=1.0, neighborhood=1)
    feats = {"patch": rng.normal(size=(3, 7, 7, 16)).astype(np.float32),
             "global": rng.normal(size=(3, 8)).astype(np.float32)}
    ref = Reference(memory_bank=bank, global_bank=rng.normal(size=(5, 8)).astype(np.float32))
    a = Scorer(config, ref).score(feats)
    b = Scorer(config, ref, search=OrtBankSearch(bank, _cpu_session)).score(feats)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(a.maps, b.maps, rtol=1e-6, atol=1e-6)


def test_projected_search_finds_the_nearest_row_of_a_bank_in_a_subspace() -> None:
    """Rows that span 8 of 64 dimensions: 8 principal axes lose nothing, so the row is exact."""
    from o2n_edge.runtime.bank_search import ProjectedSearch

    rng = np.random.default_rng(0)
    mix = rng.normal(size=(8, 64))
    bank = (rng.normal(size=(500, 8)) @ mix + 5.0).astype(np.float32)
    queries = (rng.normal(size=(200, 8)) @ mix + 5.0).astype(np.float32)
    search = ProjectedSearch(bank, 8, NumpyBankSearch)
    exact = NumpyBankSearch(bank)(queries)
    d_proj = knn_distance(queries, bank, search)
    d_exact = knn_distance(queries, bank, NumpyBankSearch(bank))
    assert np.mean(search(queries) == exact) > 0.99
    np.testing.assert_allclose(d_proj, d_exact, rtol=1e-4, atol=1e-4)


def test_projected_search_only_ever_raises_a_distance() -> None:
    """Few axes of a full-rank bank miss some rows; the exact re-measure never goes below the truth."""
    from o2n_edge.runtime.bank_search import ProjectedSearch

    rng = np.random.default_rng(1)
    bank = rng.normal(size=(400, 32)).astype(np.float32)
    queries = rng.normal(size=(300, 32)).astype(np.float32)
    d_proj = knn_distance(queries, bank, ProjectedSearch(bank, 4, NumpyBankSearch))
    d_exact = knn_distance(queries, bank, NumpyBankSearch(bank))
    assert np.all(d_proj >= d_exact - 1e-9) and np.any(d_proj > d_exact + 1e-6)


def test_scoring_config_picks_the_projected_search() -> None:
    from o2n_edge.runtime.bank_search import ProjectedSearch
    from o2n_edge.runtime.scoring import ScoringConfig, bank_search_for

    bank = np.random.default_rng(2).normal(size=(50, 16)).astype(np.float32)
    cfg = ScoringConfig(branches=("pool",), weights={"pool": 1.0}, image_size=64, search_dims=4)
    assert isinstance(bank_search_for(cfg, bank, NumpyBankSearch), ProjectedSearch)
    full = ScoringConfig.from_manifest({**cfg.to_dict(), "search_dims": 0})
    assert isinstance(bank_search_for(full, bank, NumpyBankSearch), NumpyBankSearch)
    assert ScoringConfig.from_manifest({k: v for k, v in cfg.to_dict().items() if k != "search_dims"}).search_dims == 0
