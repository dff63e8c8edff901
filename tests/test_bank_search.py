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


def test_shipped_int8_graph_is_what_the_generator_writes() -> None:
    from o2n_edge.export.bank_search_graph import build_int8_search_graph
    from o2n_edge.runtime.bank_search import INT8_GRAPH_PATH

    assert INT8_GRAPH_PATH.read_bytes() == build_int8_search_graph(), (
        "runtime/static/bank_search_int8.onnx is stale: run python -m o2n_edge.export.bank_search_graph")


def _feature_like(rng: np.random.Generator, m: int, n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """A bank of heavy-tailed rows (like CNN features) and queries near it, plus a few outliers."""
    bank = (rng.standard_t(5, size=(m, d)) * 2.0).astype(np.float32)
    queries = bank[rng.integers(0, m, n)] + rng.normal(scale=0.7, size=(n, d))
    queries[:5] *= 4.0  # defect-like rows beyond the bank's range: clipped, still searched
    return bank, queries.astype(np.float32)


@pytest.mark.parametrize("m,n,d", [(1, 7, 3), (2000, 300, 152), (600, 129, 40)])
def test_int8_search_computes_the_quantized_product_it_documents(m: int, n: int, d: int) -> None:
    """The graph's candidates are the best rows of ``Q . B - H`` computed here in plain integers."""
    from o2n_edge.runtime.bank_search import INT8_CANDIDATES, Int8BankSearch

    rng = np.random.default_rng(m + n)
    bank, queries = _feature_like(rng, m, n, d)
    search = Int8BankSearch(bank, threads=1)
    assert np.abs(search.bank_q.astype(int)).max() <= 63  # pair sums fit int16 on CPUs without VNNI
    rows = search.quantize(queries).astype(np.int64) - 128
    product = rows @ search.bank_q.astype(np.int64)
    cand = search.candidates(queries)
    k = min(INT8_CANDIDATES, m)
    assert cand.shape == (n, k) and cand.dtype == np.int64
    best = -np.sort(-product, axis=1)[:, :k]
    np.testing.assert_array_equal(np.take_along_axis(product, cand, axis=1), best)
    got = search(queries)  # the float32-nearest of the candidates
    assert got.shape == (n,) and got.dtype == np.int64
    d2 = ((queries[:, None, :] - bank[cand]) ** 2).sum(-1)
    np.testing.assert_array_equal(got, cand[np.arange(n), d2.argmin(axis=1)])
    assert search(queries[:0]).shape == (0,)


def test_int8_search_finds_the_nearest_row_or_a_near_tie() -> None:
    """Quantization may miss a near-tie, never pick a far row; the distance stays exact."""
    from o2n_edge.runtime.bank_search import Int8BankSearch

    rng = np.random.default_rng(4)
    bank, queries = _feature_like(rng, 3000, 500, 152)
    exact = knn_distance(queries, bank, NumpyBankSearch(bank))
    int8 = knn_distance(queries, bank, Int8BankSearch(bank, threads=1))
    assert np.all(int8 >= exact - 1e-9)
    assert np.mean(int8 <= exact + 1e-9) > 0.99  # the same row for almost every query
    assert np.max(int8 / exact) < 1.02  # and only near-ties otherwise
    assert np.mean(int8 / exact) < 1.0005


def test_scoring_config_picks_the_int8_search_and_reads_old_manifests() -> None:
    from o2n_edge.runtime.bank_search import Int8BankSearch, ProjectedSearch
    from o2n_edge.runtime.scoring import ScoringConfig, bank_search_for

    bank = np.random.default_rng(2).normal(size=(50, 16)).astype(np.float32)
    cfg = ScoringConfig(branches=("pool",), weights={"pool": 1.0}, image_size=64, search_precision="int8")
    assert isinstance(bank_search_for(cfg, bank, NumpyBankSearch), Int8BankSearch)
    both = bank_search_for(ScoringConfig.from_manifest({**cfg.to_dict(), "search_dims": 4}), bank, NumpyBankSearch)
    assert isinstance(both, ProjectedSearch) and isinstance(both.inner, Int8BankSearch)
    old = {k: v for k, v in cfg.to_dict().items() if k != "search_precision"}
    assert ScoringConfig.from_manifest(old).search_precision == "float32"
    with pytest.raises(ValueError, match="search_precision"):
        ScoringConfig(branches=("pool",), weights={"pool": 1.0}, image_size=64, search_precision="fp8")
