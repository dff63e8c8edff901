"""Fusion weights chosen on the shots only (leave-one-shot-out against synthetic scratches)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from o2n_edge.fusion_weights import CANDIDATES, choose_weights_loo, synthetic_scratches  # noqa: E402
from o2n_edge.profiles import get_profile  # noqa: E402
from o2n_edge.scoring import ScoringConfig, augment_views  # noqa: E402

SIZE = 32


def _encode(images: np.ndarray) -> dict[str, np.ndarray]:
    """A stand-in encoder: 4x4-pixel patches' mean colour (and its square), global = image mean."""
    x = images.astype(np.float32) / 255.0
    b = x.shape[0]
    patch = x.reshape(b, SIZE // 4, 4, SIZE // 4, 4, 3).mean(axis=(2, 4))
    patch = np.concatenate([patch, patch**2], axis=-1)
    return {"patch": patch, "global": patch.mean(axis=(1, 2))}


def _shots(n: int) -> list[np.ndarray]:
    """Flat parts of very different colours (+ noise): the memory bank of the others says little."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        base = np.full((SIZE, SIZE, 3), rng.integers(60, 200, size=3), np.int64)
        out.append(np.clip(base + rng.integers(-4, 4, base.shape), 0, 255).astype(np.uint8))
    return out


def test_scratches_are_thin_lines_on_a_copy() -> None:
    img = _shots(1)[0]
    out = synthetic_scratches(img, 3, seed=1)
    assert out.shape == (3, SIZE, SIZE, 3) and out.dtype == np.uint8
    changed = (out != img[None]).any(axis=-1).mean(axis=(1, 2))
    assert (changed > 0).all() and (changed < 0.3).all()
    assert np.array_equal(out, synthetic_scratches(img, 3, seed=1))


def test_choice_follows_what_the_normal_versions_show() -> None:
    cfg = ScoringConfig.from_profile(get_profile("lite"), ("personalized", "pool"))
    cfg = ScoringConfig(cfg.branches, cfg.weights, SIZE, cfg.topk_fraction, cfg.global_weight, 1.0)
    shots = _shots(3)

    def informative(images: np.ndarray) -> np.ndarray:  # a good transform: the part without the line
        med = np.median(images.reshape(len(images), -1, 3), axis=1)
        return np.broadcast_to(med[:, None, None, :], images.shape).astype(np.uint8)

    def useless(images: np.ndarray) -> np.ndarray:  # normal version = the query: no information
        return images.copy()

    good = choose_weights_loo(shots, _encode, informative, cfg, augment_views, seed=0)
    # lite scores without the global cosine term (issue 11), so the informative transform's gain
    # shows in the maps only: it earns at least the bank's weight, the useless one the least
    assert good["weights"]["personalized"] >= 1.0 and good["weights"]["pool"] == 1.0
    assert set(good["auroc"]) == {str(w) for w in CANDIDATES}
    bad = choose_weights_loo(shots, _encode, useless, cfg, augment_views, seed=0)
    assert bad["weights"]["personalized"] == min(CANDIDATES)  # ties go to the memory bank
    assert good["auroc"][str(max(CANDIDATES))] > bad["auroc"][str(max(CANDIDATES))]
    one = choose_weights_loo(shots[:1], _encode, informative, cfg, augment_views)
    assert one["weights"] == cfg.weights and "one shot" in one["method"]


def test_profiles_default_branches_and_selection() -> None:
    from o2n_edge.profiles import parse_branches

    lite, sd15 = get_profile("lite"), get_profile("sd15")
    assert lite.fusion_selection == "loo" and sd15.fusion_selection == "fixed"
    assert sd15.weights == {"personalized": 1.0, "pool": 1.0, "text": 0.5}  # the paper's
    assert parse_branches(None, lite) == lite.default_branches
    assert parse_branches("personalized,pool", lite) == ("personalized", "pool")  # still available
