"""The numpy runtime scoring matches the torch reference on the same features (the parity contract)."""

from __future__ import annotations

import numpy as np
import pytest

from o2n_edge.runtime.scoring import ScoringParams, Scorer, bilinear_matrix, gaussian_matrix
from o2n_edge.scoring import (
    ScoringConfig,
    augment_views,
    build_reference,
    ring_index,
    score,
    scoring_manifest,
    upsample_and_smooth,
)

RTOL, ATOL = 1e-5, 1e-4  # runtime vs reference scores: the reference keeps its maps in float32


def _feats(rng: np.random.Generator, b: int, h: int = 7, d: int = 16, g: int = 8, text: bool = True) -> dict:
    out = {
        "patch": rng.normal(size=(b, h, h, d)).astype(np.float32),
        "global": rng.normal(size=(b, g)).astype(np.float32),
    }
    if text:
        out["patch_text"] = rng.normal(size=(b, h, h, g)).astype(np.float32)
    return out


def _text_features(rng: np.random.Generator, g: int = 8) -> np.ndarray:
    t = rng.normal(size=(2, g))
    return (t / np.linalg.norm(t, axis=1, keepdims=True)).astype(np.float32)


def _params(config: ScoringConfig, ref) -> ScoringParams:
    return ScoringParams.from_manifest(scoring_manifest(config, ref))


@pytest.mark.parametrize("branches", [("pool",), ("text",), ("personalized",), ("personalized", "pool", "text")])
@pytest.mark.parametrize("shots", [1, 3])
def test_runtime_scores_match_reference(branches: tuple[str, ...], shots: int) -> None:
    rng = np.random.default_rng(shots)
    config = ScoringConfig(branches=branches, weights={"personalized": 1.0, "pool": 1.0, "text": 0.5},
                           image_size=40, topk_fraction=0.02, global_weight=0.5, smoothing_sigma=2.0)
    shot_feats = [_feats(rng, 6) for _ in range(shots)]  # 6 augmented views each
    tf = _text_features(rng)
    shot_normal = _feats(rng, shots, text=False)
    ref = build_reference(shot_feats, config, tf, pool_feats=_feats(rng, 2), shot_normal_feats=shot_normal)
    query, normal = _feats(rng, 5), _feats(rng, 5, text=False)

    expected = score(query, ref, config, normal)
    got = Scorer(_params(config, ref), ref.memory_bank, ref.global_bank, ref.text_features).score(query, normal)

    np.testing.assert_allclose(got.scores, expected.scores, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got.maps, expected.maps, rtol=1e-4, atol=1e-5)
    for b in branches:
        np.testing.assert_allclose(got.branch_maps[b], expected.branch_maps[b], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shots", [1, 3])
def test_stats_branch_matches_reference(shots: int) -> None:
    """The global statistics branch scores the same in numpy and torch, and sees a global shift."""
    rng = np.random.default_rng(10 + shots)
    config = ScoringConfig(branches=("pool",), weights={"pool": 1.0}, image_size=40, topk_fraction=0.02,
                           smoothing_sigma=2.0, stats_weight=1.0)
    shot_feats = [_feats(rng, 6, text=False) for _ in range(shots)]
    ref = build_reference(shot_feats, config)
    assert "global_stats" in ref.norm and ref.stats_bank.shape == (6 * shots, 32)
    query = _feats(rng, 4, text=False)
    query["patch"][2] *= 1.8  # a whole-image change: every patch scaled
    expected = score(query, ref, config)
    got = Scorer(_params(config, ref), ref.memory_bank, ref.global_bank, None,
                 stats_bank=ref.stats_bank, stats_scale=ref.stats_scale).score(query)
    np.testing.assert_allclose(got.scores, expected.scores, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got.stats, expected.stats, rtol=1e-5, atol=1e-6)
    assert int(np.argmax(expected.stats)) == 2
    off = score(query, ref, ScoringConfig(branches=("pool",), weights={"pool": 1.0}, image_size=40,
                                          topk_fraction=0.02, smoothing_sigma=2.0))
    assert off.stats is None and not np.allclose(off.scores, expected.scores)


@pytest.mark.parametrize("shots", [1, 2])
def test_border_rings_match_reference_and_lift_an_inner_defect(shots: int) -> None:
    """Per-ring standardization: numpy equals torch, and a border that is far from the bank in every
    good image no longer outranks a defect inside (the reason the lite profile uses it)."""
    rng = np.random.default_rng(20 + shots)
    h = 10

    def images(b: int) -> dict:
        f = _feats(rng, b, h=h, text=False)
        edge = ring_index(h, h, 1) == 0
        f["patch"][:, edge] += rng.normal(scale=4.0, size=(b, int(edge.sum()), 16)).astype(np.float32)
        return f

    shot_feats = [images(6) for _ in range(shots)]
    base = dict(branches=("pool",), weights={"pool": 1.0}, image_size=40, topk_fraction=0.01, smoothing_sigma=1.0,
                global_weight=0.0)
    rings = ScoringConfig(**base, border_fraction=0.2)
    ref = build_reference(shot_feats, rings)
    assert len(ref.ring_norm["pool"]) == 3
    assert ref.ring_norm["pool"][0][0] > ref.ring_norm["pool"][2][0]  # the border is farther from the bank
    query = images(6)
    query["patch"][3:, 4:6, 4:6] += 3.0  # a small defect inside images 3, 4, 5
    expected = score(query, ref, rings)
    got = Scorer(_params(rings, ref), ref.memory_bank, ref.global_bank, None).score(query)
    np.testing.assert_allclose(got.scores, expected.scores, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got.maps, expected.maps, rtol=RTOL, atol=ATOL)
    labels = np.array([0, 0, 0, 1, 1, 1])
    from sklearn.metrics import roc_auc_score

    plain = score(query, build_reference(shot_feats, ScoringConfig(**base)), ScoringConfig(**base))
    assert roc_auc_score(labels, expected.scores) == 1.0
    assert roc_auc_score(labels, expected.scores) > roc_auc_score(labels, plain.scores)


def test_upsample_smooth_matrix_matches_torch() -> None:
    rng = np.random.default_rng(0)
    grid = rng.normal(size=(2, 7, 7))
    import torch

    expected = upsample_and_smooth(torch.from_numpy(grid).float(), 56, 4.0).double().numpy()
    a = gaussian_matrix(56, 4.0) @ bilinear_matrix(56, 7)
    got = np.einsum("sh,bhw,tw->bst", a, grid, a)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_reference_scores_an_outlier_higher() -> None:
    """A query far from the shots scores above one that is a copy of a shot (the bank works)."""
    rng = np.random.default_rng(1)
    config = ScoringConfig(branches=("pool",), weights={"pool": 1.0}, image_size=28, smoothing_sigma=1.0)
    shot_feats = [_feats(rng, 6, text=False) for _ in range(2)]
    ref = build_reference(shot_feats, config)
    normal_query = {k: v[:1].copy() for k, v in shot_feats[0].items()}
    odd_query = {k: v + 5.0 for k, v in normal_query.items()}
    both = {k: np.concatenate([normal_query[k], odd_query[k]]) for k in normal_query}
    res = score(both, ref, config)
    assert res.scores[1] > res.scores[0]
    assert res.maps.shape == (2, 28, 28)


def test_augment_views_original_first() -> None:
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    views = augment_views(img)
    assert len(views) == 6 and np.array_equal(views[0], img)
    assert all(v.flags["C_CONTIGUOUS"] for v in views)


def test_knn_distance_equals_brute_force_cdist() -> None:
    import torch

    from o2n_edge.scoring import knn_distance

    g = torch.Generator().manual_seed(0)
    q, bank = torch.randn(300, 24, generator=g), torch.randn(500, 24, generator=g)
    expected = torch.cdist(q.double(), bank.double()).min(dim=1).values
    got = knn_distance(q, bank, chunk=64)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
