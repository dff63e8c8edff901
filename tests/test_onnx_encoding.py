"""Offline encoding through the encoder's traced graph on onnxruntime (encoders/onnx_runner.py).

Why these tests: the bank of every lite bundle and every ``eval`` figure now come from this path,
so it must give torch's features, leave the torch encoder untouched (a fresh wrapper traced in
training mode once left the BatchNorms on batch statistics), and step aside where it cannot help.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from o2n_edge.encoders import build_encoder, encode_images  # noqa: E402
from o2n_edge.encoders.onnx_runner import ENV_BACKEND, onnx_runner_for  # noqa: E402
from o2n_edge.profiles import PROFILES  # noqa: E402

SPEC = replace(PROFILES["lite"].encoder, image_size=224)


@pytest.fixture(scope="module")
def lite():
    return build_encoder(SPEC)


def _images(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (240, 260, 3), dtype=np.uint8) for _ in range(n)]


def test_graph_features_match_torch_and_leave_the_encoder_in_eval_mode(lite, monkeypatch) -> None:
    images = _images(3, 0)
    runner = onnx_runner_for(lite)
    assert runner is not None and runner is onnx_runner_for(lite)  # built once per encoder
    assert not lite.training and not any(m.training for m in lite.modules())
    fast = encode_images(lite, images, batch_size=2)
    monkeypatch.setenv(ENV_BACKEND, "torch")
    assert onnx_runner_for(lite) is None
    slow = encode_images(lite, images, batch_size=2)
    for key in ("patch", "global"):
        assert fast[key].shape == slow[key].shape and fast[key].dtype == np.float32
        np.testing.assert_allclose(fast[key], slow[key], rtol=1e-4, atol=1e-3)
    # the comparison is not vacuous: different images give different features
    other = encode_images(lite, _images(1, 1))
    assert np.abs(other["patch"][0] - slow["patch"][0]).max() > 0.1


def test_a_graph_that_disagrees_with_torch_falls_back(lite, monkeypatch, caplog) -> None:
    from o2n_edge.encoders import onnx_runner

    other = build_encoder(SPEC)
    monkeypatch.setattr(onnx_runner.OnnxEncoderRunner, "agrees_with", lambda self, enc: 3.5)
    assert onnx_runner_for(other) is None
    assert "differs from torch by 3.5" in caplog.text
    out = encode_images(other, _images(1, 2))  # still encodes, with torch
    assert out["patch"].shape == (1, 28, 28, other.patch_dim)


def test_encoders_that_did_not_opt_in_keep_torch() -> None:
    from o2n_edge.encoders.clip import OpenClipEncoder

    assert OpenClipEncoder.onnx_encoding is False
    assert PROFILES["lite"].encoder.kind.startswith("efficientnet_lite")


def test_a_new_thread_count_gets_a_new_session(lite) -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = onnx_runner_for(lite)
        assert one is not None and one.threads == 1
        torch.set_num_threads(2)
        two = onnx_runner_for(lite)
        assert two is not None and two.threads == 2 and two is not one
    finally:
        torch.set_num_threads(before)
