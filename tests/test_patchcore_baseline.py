"""The plain PatchCore baseline study (benchmarks/patchcore_baseline.py) on tiny synthetic cases.

Why: the baseline is the yardstick of every accuracy table, so its definition (stride-8 + 16
Lite0 features at 256 px, 8 views, max nearest-neighbour distance) must not drift silently.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("scipy")

from benchmarks import patchcore_baseline as pcb  # noqa: E402


def _image(seed: int, size: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_features_are_a_32x32_grid_of_152_channels_at_256px() -> None:
    feats = pcb.lite0_features()([_image(0), _image(1)])
    assert feats.shape == (2, 32, 32, 152) and feats.dtype == np.float32


def test_stages_are_timm_features_only_out_indices_2_3() -> None:
    timm = pytest.importorskip("timm")
    from o2n_edge.encoders.efficientnet import EfficientNetLiteEncoder
    from o2n_edge.profiles import EncoderSpec

    ref = timm.create_model("efficientnet_lite0", pretrained=False, features_only=True, out_indices=(2, 3))
    assert ref.feature_info.module_name() == ["blocks.2", "blocks.4"]
    assert ref.feature_info.channels() == [40, 112] and ref.feature_info.reduction() == [8, 16]
    enc = EfficientNetLiteEncoder(EncoderSpec("efficientnet_lite0", 256, layers=pcb.STAGES))
    maps, _ = enc.stage_maps(torch.zeros(1, 3, 256, 256))
    assert [tuple(maps[i].shape) for i in pcb.STAGES] == [(1, 40, 32, 32), (1, 112, 16, 16)]


def test_eight_distinct_views_identity_first() -> None:
    im = np.arange(4 * 4 * 1, dtype=np.uint8).reshape(4, 4, 1)
    views = pcb.dihedral_views(im)
    assert len(views) == 8 and np.array_equal(views[0], im)
    assert len({v.tobytes() for v in views}) == 8


def _fake_features(images: list[np.ndarray]) -> np.ndarray:
    """4x4 grid, 3 channels: the mean colour of each 2x2 block of an 8x8 image (deterministic)."""
    arr = np.stack(images).astype(np.float32)
    return arr.reshape(len(arr), 4, 2, 4, 2, 3).mean((2, 4))


def test_bank_holds_every_patch_of_every_view() -> None:
    bank = pcb.build_bank([_image(0, 8), _image(1, 8)], _fake_features)
    assert bank.shape == (2 * 8 * 16, 3)


def test_nn_distance_matches_brute_force_across_chunks() -> None:
    rng = np.random.default_rng(0)
    q, b = rng.normal(size=(3, 5, 5, 7)).astype(np.float32), rng.normal(size=(37, 7)).astype(np.float32)
    brute = np.sqrt(((q[..., None, :] - b) ** 2).sum(-1)).min(-1)
    got = pcb.nn_distances(q, b, query_chunk=8, bank_chunk=10)
    assert got.shape == (3, 5, 5)
    np.testing.assert_allclose(got, brute, rtol=1e-4, atol=1e-4)


def test_shot_scores_zero_and_image_score_is_max_distance() -> None:
    shot, other = _image(0, 8), _image(1, 8)
    bank = pcb.build_bank([shot], _fake_features)
    dist = pcb.nn_distances(_fake_features([shot, np.rot90(shot).copy(), other]), bank)
    scores = pcb.image_scores(dist)
    assert scores[0] < 1e-2 and scores[1] < 1e-2  # the shot itself, and a rotated copy (a view in the bank)
    assert scores[2] > 1.0
    assert scores[2] == pytest.approx(dist[2].max())


def test_pixel_map_is_image_sized_and_blurred() -> None:
    dist = np.zeros((1, 32, 32), dtype=np.float32)
    dist[0, 16, 16] = 1.0
    maps = pcb.pixel_maps(dist)
    assert maps.shape == (1, 256, 256)
    assert maps.max() < 1.0 and maps[0, 0, 0] == pytest.approx(0.0, abs=1e-6)
    peak = np.unravel_index(int(maps[0].argmax()), (256, 256))
    assert abs(peak[0] - 132) <= 4 and abs(peak[1] - 132) <= 4


def test_summary_compares_on_the_default_seeds_and_marks_missing() -> None:
    base = [{"category": "tire", "shots": 1, "seed": s, "image_auroc": a, "image_ap": a, "image_f1max": a,
             "pixel_auroc": a, "pixel_pro": a, "wall_s": 1.0} for s, a in ((0, 0.6), (1, 0.8))]
    base.append({**base[0], "shots": 4})
    default = [{**base[0], "image_auroc": 0.7}]
    rows, md = pcb.summarize(base, default, ["tire"])
    assert rows[0]["delta"]["image_auroc"] == pytest.approx(0.1)  # 0.7 - seed 0's 0.6, not the 0.7 mean
    assert rows[1]["default"] is None and "not run" in md
