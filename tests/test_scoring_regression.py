"""Scoring gives the stored numbers: reference constants, image scores, maps (tests/data).

Why: eval, export and the runtime all score through one implementation; this pins what it
computes on fixed inputs (written by ``tests/data/make_scoring_regression.py`` from the code
of the time), so a rewrite that changes a number fails here, not in a customer's threshold.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parent / "data"
sys.path.insert(0, str(DATA))
import make_scoring_regression as gen  # noqa: E402

from o2n_edge.reference import augment_views, build_reference  # noqa: E402
from o2n_edge.runtime.scoring import (  # noqa: E402
    Reference,
    Scorer,
    ScoringConfig,
    ring_index,
    score,
    scoring_manifest,
)

# Stored maps and raw branch maps are float32; the image scores add standardized terms of up to a
# few hundred (a one-shot global text score), so float32 rounding there reaches ~1e-5 absolute.
RTOL, ATOL = 1e-5, 1e-5


@pytest.fixture(scope="module")
def stored() -> dict[str, np.ndarray]:
    with np.load(gen.OUT) as z:
        return {k: z[k] for k in z.files}


def _case(stored: dict[str, np.ndarray], case: str):
    config = gen.case_config(case)
    a = gen.case_inputs(stored, case)
    ref = build_reference(a["shot_feats"], config, a["text_features"], a["pool_feats"], a["shot_normal"])
    return config, a, ref


# Scoring keys added after the stored file was written, with the value that changes nothing.
ADDED_KEYS = {"search_dims": 0, "stats_region_floor": False, "search_precision": "float32"}


def _assert_same_numbers(got, want, path: str = "") -> None:
    """Equal structure; numbers equal to RTOL (the manifest holds float64 constants)."""
    if isinstance(want, dict):
        if not path:  # the scoring section: keys added since hold their off value
            want = {**{k: v for k, v in ADDED_KEYS.items() if k in got}, **want}
        assert sorted(got) == sorted(want), path
        for k in want:
            _assert_same_numbers(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same_numbers(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-9, err_msg=path)
    else:
        assert got == want, path


@pytest.mark.parametrize("case", list(gen.CASES))
def test_reference_constants(stored: dict[str, np.ndarray], case: str) -> None:
    config, _, ref = _case(stored, case)
    manifest = json.loads(json.dumps(scoring_manifest(config, ref)))
    _assert_same_numbers(manifest, json.loads(str(stored[f"{case}/manifest"])))
    if f"{case}/stats_bank" in stored:
        np.testing.assert_allclose(ref.stats_bank, stored[f"{case}/stats_bank"], rtol=RTOL, atol=1e-6)
        np.testing.assert_allclose(ref.stats_scale, stored[f"{case}/stats_scale"], rtol=RTOL, atol=1e-6)
    else:
        assert ref.stats_bank is None


@pytest.mark.parametrize("case", list(gen.CASES))
def test_scores_and_maps(stored: dict[str, np.ndarray], case: str) -> None:
    config, a, ref = _case(stored, case)
    res = score(a["query"], ref, config, a["query_normal"])
    np.testing.assert_allclose(res.scores, stored[f"{case}/scores"], rtol=RTOL, atol=ATOL)
    s = gen.MAP_STRIDE
    np.testing.assert_allclose(res.maps[:, ::s, ::s], stored[f"{case}/maps"], rtol=RTOL, atol=ATOL)
    for b in config.branches:
        np.testing.assert_allclose(res.branch_maps[b], stored[f"{case}/branch_map/{b}"], rtol=RTOL, atol=1e-6)
        np.testing.assert_allclose(res.global_scores[b], stored[f"{case}/global/{b}"], rtol=RTOL, atol=1e-6)
    if config.stats_weight > 0:
        np.testing.assert_allclose(res.stats, stored[f"{case}/stats"], rtol=RTOL, atol=1e-6)
    else:
        assert res.stats is None


def test_augment_views(stored: dict[str, np.ndarray]) -> None:
    views = augment_views(stored["in/image"])
    assert np.array_equal(np.stack(views), stored["augment_views"])
    assert np.array_equal(views[0], stored["in/image"]) and all(v.flags["C_CONTIGUOUS"] for v in views)


def test_stored_file_is_small() -> None:
    assert gen.OUT.stat().st_size < 200_000


def test_manifest_round_trip(stored: dict[str, np.ndarray]) -> None:
    """What export writes is what the runtime reads back: same config, same constants, same scores."""
    config, a, ref = _case(stored, "triplet_k2_stats_rings")
    m = json.loads(json.dumps(scoring_manifest(config, ref)))
    back = Reference.from_manifest(m, ref.memory_bank, ref.global_bank, ref.text_features,
                                   ref.stats_bank, ref.stats_scale)
    assert ScoringConfig.from_manifest(m) == config
    assert back.norm == ref.norm and back.ring_norm == ref.ring_norm
    want = score(a["query"], ref, config, a["query_normal"]).scores
    got = Scorer(ScoringConfig.from_manifest(m), back).score(a["query"], a["query_normal"]).scores
    np.testing.assert_array_equal(got, want)


def test_border_rings_lift_an_inner_defect() -> None:
    """A border that is far from the bank in every good image no longer outranks a defect inside
    (why the lite profile standardizes per ring)."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(22)
    h = 10

    def images(b: int) -> dict[str, np.ndarray]:
        f = {"patch": rng.normal(size=(b, h, h, 16)).astype(np.float32),
             "global": rng.normal(size=(b, 8)).astype(np.float32)}
        edge = ring_index(h, h, 1) == 0
        f["patch"][:, edge] += rng.normal(scale=4.0, size=(b, int(edge.sum()), 16)).astype(np.float32)
        return f

    shot_feats = [images(6) for _ in range(2)]
    base = dict(branches=("pool",), weights={"pool": 1.0}, image_size=40, topk_fraction=0.01, smoothing_sigma=1.0,
                global_weight=0.0)
    rings = ScoringConfig(**base, border_fraction=0.2)
    ref = build_reference(shot_feats, rings)
    assert len(ref.ring_norm["pool"]) == 3
    assert ref.ring_norm["pool"][0][0] > ref.ring_norm["pool"][2][0]  # the border is farther from the bank
    query = images(6)
    query["patch"][3:, 4:6, 4:6] += 3.0  # a small defect inside images 3, 4, 5
    labels = np.array([0, 0, 0, 1, 1, 1])
    with_rings = score(query, ref, rings).scores
    plain = score(query, build_reference(shot_feats, ScoringConfig(**base)), ScoringConfig(**base)).scores
    assert roc_auc_score(labels, with_rings) == 1.0 > roc_auc_score(labels, plain)


def test_stats_branch_sees_a_whole_image_change(stored: dict[str, np.ndarray]) -> None:
    """The lite query scaled as a whole (query 2) has the largest statistics distance."""
    config, a, ref = _case(stored, "lite_k3")
    res = score(a["query"], ref, config)
    assert int(np.argmax(res.stats)) == 2
