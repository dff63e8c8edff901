"""Self-tuning from the shots: synthetic defects, encode-once features, pseudo-validation, eval."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from o2n_edge.profiles import get_profile
from o2n_edge.tuning import Candidate, candidate_from_record, pseudo_validate
from o2n_edge.tuning.search import make_folds
from o2n_edge.tuning.synthetic import KINDS, good_variants, synthesize

SMALL = dict(image_size=96)  # small inputs keep the real Lite0 fast


@pytest.fixture(scope="module")
def shots(shared_data: Path) -> list[np.ndarray]:
    from o2n_edge.data import load_image

    files = sorted((shared_data / "hazelnut_toy" / "hazelnut" / "train" / "good").glob("*.jpg"))[:2]
    return [load_image(f, 160) for f in files]


def test_synthetic_defects_are_deterministic_and_visible(shots) -> None:
    for kind in KINDS:
        a = synthesize(shots[0], kind, np.random.default_rng(3), shots[1])
        b = synthesize(shots[0], kind, np.random.default_rng(3), shots[1])
        assert a.dtype == np.uint8 and a.shape == shots[0].shape
        np.testing.assert_array_equal(a, b)
        changed = np.abs(a.astype(int) - shots[0].astype(int)).max(axis=2) > (3 if kind == "global" else 20)
        assert changed.any(), kind
        if kind != "global":  # local defects stay local
            assert changed.mean() < 0.2, (kind, changed.mean())
    with pytest.raises(ValueError, match="unknown synthetic defect"):
        synthesize(shots[0], "nope", np.random.default_rng(0))
    goods = good_variants(shots[0], np.random.default_rng(0), 2)
    assert len(goods) == 2 and np.abs(goods[0].astype(int) - shots[0].astype(int)).mean() < 40


def test_folds_leave_each_shot_out(shots) -> None:
    folds = make_folds(shots, seed=0)
    assert [f.held_out for f in folds] == [0, 1] and [f.bank for f in folds] == [[1], [0]]
    assert all(len(f.positives) == len(f.kinds) for f in folds)
    assert set(folds[0].kinds) == set(KINDS)
    assert make_folds(shots[:1], seed=0)[0].bank == []  # one shot: its own views are the bank


def test_trunk_composition_equals_the_exported_encoder(shots) -> None:
    """Features composed from cached stage maps are the encoder graph's features (tiles included)."""
    from o2n_edge.encoders import build_encoder, encode_images
    from o2n_edge.tuning.features import encode_trunk

    base = get_profile("lite").encoder
    cand = Candidate(image_size=96, tiles=2, layers=(2, 3), aggregation=5)
    spec = cand.encoder_spec(base)
    trunk = encode_trunk(spec, shots)
    got = trunk.compose(cand.layers, cand.aggregation)
    want = encode_images(build_encoder(spec), shots)
    np.testing.assert_allclose(got["patch"], want["patch"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["global"], want["global"], rtol=1e-4, atol=1e-4)


def test_pseudo_validate_records_and_chooses_the_best(shots) -> None:
    profile = get_profile("lite")
    cands = [Candidate(**SMALL), Candidate(**SMALL, stats_weight=1.0), Candidate(**SMALL, layers=(2, 3))]
    rec = pseudo_validate(shots, cands, profile, seed=0)
    scores = {r["candidate"]["name"]: r["pseudo_auroc"] for r in rec["candidates"]}
    assert list(scores) == [c.name for c in cands] and all(0.0 <= v <= 1.0 for v in scores.values())
    assert rec["pseudo_auroc"] == scores[rec["chosen"]["name"]]
    assert rec["pseudo_auroc"] >= max(scores.values()) - 0.005 - 1e-12
    assert candidate_from_record(rec).name == rec["chosen"]["name"]
    again = pseudo_validate(shots, cands, profile, seed=0)
    assert again["candidates"] == rec["candidates"]  # deterministic


def test_eval_self_tunes_per_run_and_reports_it(shared_data: Path) -> None:
    from o2n_edge.data import load_dataset
    from o2n_edge.evaluation import evaluate

    profile = replace(get_profile("lite"), self_tune=(Candidate(**SMALL), Candidate(**SMALL, stats_weight=1.0)))
    ds = load_dataset(shared_data / "hazelnut_toy", "mvtec", "hazelnut")
    res = evaluate(ds, profile, [1], [0], ("pool",), progress=False, coreset=0.5)
    run = res["runs"][0]
    assert res["self_tuned"] and run["setting"] == run["tuning"]["chosen"]["name"]
    assert run["tuning"]["folds"] == 1 and len(run["tuning"]["candidates"]) == 2
    assert 0.5 < run["image_auroc"] <= 1.0 and res["summary"][0]["settings"] == [run["setting"]]


def test_with_image_size_moves_the_encoder_and_every_candidate() -> None:
    """--image-size is the user's speed choice: self-tuning must not overrule it."""
    from o2n_edge.profiles import with_image_size

    lite = get_profile("lite")
    fast = with_image_size(lite, 224)
    assert fast.encoder.image_size == 224 and fast.encoder.input_size == 224
    sizes = {c["image_size"] if isinstance(c, dict) else c.image_size for c in fast.self_tune}
    assert sizes <= {224}
    assert len(fast.self_tune) <= len(lite.self_tune)
    with pytest.raises(ValueError, match="--image-size"):
        with_image_size(lite, 10)
