"""Encoders: shapes, weight mapping, ImageNet sanity, determinism, preprocessing parity, ONNX."""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")
pytest.importorskip("timm")

from o2n_edge.encoders import (  # noqa: E402
    FeatureEncoder,
    build_encoder,
    encode_images,
    preprocess_numpy,
)
from o2n_edge.encoders.clip import patch_layer_indices  # noqa: E402
from o2n_edge.encoders.efficientnet import (  # noqa: E402
    LITE_MEAN,
    LITE_STD,
    lite0_weights_path,
    map_state_dict,
)
from o2n_edge.profiles import PROFILES, EncoderSpec  # noqa: E402

TINY_SPEC = PROFILES["tiny"].encoder
# The encoder mechanics are pinned at 224 px (the fast setting; the lite default is 448 px).
LITE_SPEC = replace(PROFILES["lite"].encoder, image_size=224)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ONNX_OPSET = 17
ONNX_ATOL = 1e-4
NUM_PHOTOS = 8
# A registered *name* (not "tiny") so the named-model code path, the one sd15 uses, is taken.
TEST_VIT_NAME = "ViT-T-8-o2ntest"
TEST_VIT_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def _rand_images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _forward(encoder: FeatureEncoder, pixels: torch.Tensor) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        return {k: v.numpy() for k, v in encoder(pixels).items()}


@pytest.fixture(scope="module")
def tiny() -> FeatureEncoder:
    return build_encoder(TINY_SPEC)


@pytest.fixture(scope="module")
def lite() -> FeatureEncoder:
    return build_encoder(LITE_SPEC)


@pytest.fixture(scope="module")
def photos(shared_data: Path) -> list[np.ndarray]:
    """Real photos (hazelnut_toy train/good), as uint8 RGB arrays."""
    from PIL import Image

    files = sorted((shared_data / "hazelnut_toy" / "hazelnut" / "train" / "good").glob("*.jpg"))
    assert len(files) >= NUM_PHOTOS
    return [np.asarray(Image.open(f).convert("RGB")) for f in files[:NUM_PHOTOS]]


# --------------------------------------------------------------------------- contract / shapes


def test_unknown_kind_is_clear_error() -> None:
    with pytest.raises(ValueError, match="open_clip"):
        build_encoder(EncoderSpec(kind="resnet", image_size=224))


def test_tiny_shapes_and_outputs(tiny: FeatureEncoder) -> None:
    assert not tiny.training and tiny.has_text
    assert tiny.image_size == 64 and tiny.grid == (8, 8)
    assert (tiny.patch_dim, tiny.global_dim) == (64, 32)
    assert tiny.output_names == ("patch", "global", "patch_text")
    x = tiny.preprocess(_rand_images(3, 50, 70))
    assert x.shape == (3, 3, 64, 64) and x.dtype == torch.float32
    out = _forward(tiny, x)
    assert out["patch"].shape == (3, 8, 8, 64)
    assert out["global"].shape == (3, 32)
    assert out["patch_text"].shape == (3, 8, 8, 32)
    assert all(np.isfinite(v).all() for v in out.values())
    np.testing.assert_allclose(np.linalg.norm(out["global"], axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out["patch_text"], axis=-1), 1.0, atol=1e-5)
    with torch.inference_mode():  # "global" is exactly open_clip's normalized image embedding
        ref = tiny.model.encode_image(x, normalize=True).numpy()
    np.testing.assert_allclose(out["global"], ref, atol=1e-6)


def test_patch_layers_are_middle_and_late() -> None:
    assert patch_layer_indices(2) == (0, 1)
    assert patch_layer_indices(12) == (5, 8)
    assert patch_layer_indices(24) == (11, 17)


def test_lite0_shapes(lite: FeatureEncoder) -> None:
    assert not lite.training and not lite.has_text
    assert lite.image_size == 224 and lite.grid == (28, 28)
    assert lite.patch_dim == 40 + 112
    assert lite.output_names == ("patch", "global")
    assert (lite.mean, lite.std) == (LITE_MEAN, LITE_STD)
    out = _forward(lite, lite.preprocess(_rand_images(2, 240, 200)))
    assert out["patch"].shape == (2, 28, 28, 152)
    assert out["global"].shape == (2, lite.global_dim)
    with pytest.raises(NotImplementedError):
        lite.encode_text(["a photo"])


def test_lite_without_head_stops_after_the_last_patch_stage(lite: FeatureEncoder) -> None:
    """The lite profile gives the global term no weight, so it skips the classifier head: the
    same patch features, and the mean patch feature as the global one."""
    from dataclasses import replace

    assert PROFILES["lite"].encoder.global_from_head is False
    full = build_encoder(replace(lite.spec, global_from_head=True))
    short = build_encoder(replace(lite.spec, global_from_head=False))
    assert (full.global_dim, short.global_dim) == (1280, 152)
    x = full.preprocess(_rand_images(2, 224, 224))
    a, b = _forward(full, x), _forward(short, x)
    np.testing.assert_array_equal(a["patch"], b["patch"])
    np.testing.assert_allclose(b["global"], b["patch"].mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    ran = []
    hooks = [m.register_forward_hook(lambda *_: ran.append(1)) for m in (short.model.blocks[5], short.model.conv_head)]
    _forward(short, x)
    for h in hooks:
        h.remove()
    assert not ran, "the blocks after the last patch stage must not run"


# --------------------------------------------------------------------------- Lite0 weights


def test_lite0_mapping_complete_and_exact(lite: FeatureEncoder) -> None:
    source = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    mapped = map_state_dict(source, lite.model)
    model_sd = lite.model.state_dict()
    assert len(mapped) == len(source) == len(model_sd)  # a bijection: nothing left at its init
    for key, tensor in source.items():
        target = [k for k, t in mapped.items() if t is tensor]
        assert len(target) == 1, key
        assert torch.equal(model_sd[target[0]], tensor), f"{key} -> {target[0]} differs"


def test_lite0_mapping_rejects_bad_files(lite: FeatureEncoder) -> None:
    source = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    missing = dict(source)
    missing.pop("_blocks.7._bn1.running_var")
    with pytest.raises(ValueError, match="unmapped"):
        map_state_dict(missing, lite.model)
    bad_shape = dict(source)
    bad_shape["_fc.bias"] = torch.zeros(10)
    with pytest.raises(ValueError, match="shape"):
        map_state_dict(bad_shape, lite.model)
    extra = dict(source)
    extra["_blocks.99._bn0.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="block 99"):
        map_state_dict(extra, lite.model)


def _stats(probs: torch.Tensor) -> tuple[float, float]:
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean().item()
    return probs.max(-1).values.mean().item(), entropy


def test_lite0_imagenet_sanity_and_normalization(
    lite: FeatureEncoder, photos: list[np.ndarray]
) -> None:
    """On real photos the classifier is confident, and 127/128 beats the ImageNet mean/std."""
    with torch.inference_mode():
        probs = lite.classify(lite.preprocess(photos)).softmax(-1)
        alt = preprocess_numpy(photos, lite.image_size, IMAGENET_MEAN, IMAGENET_STD)
        probs_alt = lite.classify(torch.from_numpy(alt)).softmax(-1)
    top1, entropy = _stats(probs)
    _, entropy_alt = _stats(probs_alt)
    assert top1 > 50.0 / 1000  # uniform would be 0.001
    assert entropy < entropy_alt - 0.2
    # The stem BatchNorm's running statistics fit inputs normalized with 127/128 best.
    bn = lite.model.bn1

    def stem_mismatch(pixels: torch.Tensor) -> float:
        with torch.inference_mode():
            z = lite.model.conv_stem(pixels)
        mu = z.mean(dim=(0, 2, 3))
        return ((mu - bn.running_mean).abs() / (bn.running_var + 1e-3).sqrt()).mean().item()

    assert stem_mismatch(lite.preprocess(photos)) < stem_mismatch(torch.from_numpy(alt)) - 0.1


# --------------------------------------------------------------------------- determinism


def test_tiny_seeded_init_is_deterministic(tiny: FeatureEncoder) -> None:
    x = tiny.preprocess(_rand_images(2, 64, 64, seed=3))
    torch.manual_seed(1234)
    expected_next = torch.rand(4)
    torch.manual_seed(1234)
    again = build_encoder(TINY_SPEC)
    assert torch.equal(torch.rand(4), expected_next)  # the caller's RNG stream is untouched
    other = build_encoder(replace(TINY_SPEC, seed=1))
    a, b, c = _forward(tiny, x), _forward(again, x), _forward(other, x)
    for key in tiny.output_names:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.allclose(a["global"], c["global"])


# --------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("which", ["tiny", "lite"])
def test_preprocess_torch_equals_numpy(
    which: str, tiny: FeatureEncoder, lite: FeatureEncoder
) -> None:
    enc = tiny if which == "tiny" else lite
    rng = np.random.default_rng(7)
    images = [
        rng.integers(0, 256, (97, 131, 3), dtype=np.uint8),  # non-square, downscaled/upscaled
        rng.integers(0, 256, (enc.image_size, enc.image_size, 3), dtype=np.uint8),  # exact size
        rng.integers(0, 256, (300, 300), dtype=np.uint8),  # grey
    ]
    ref = preprocess_numpy(images, enc.image_size, enc.mean, enc.std)
    got = enc.preprocess(images).numpy()
    assert ref.dtype == np.float32 and ref.shape == (3, 3, enc.image_size, enc.image_size)
    assert np.abs(got - ref).max() == 0.0
    batch = np.stack([images[0], images[0]])
    assert np.abs(enc.preprocess(batch).numpy() - preprocess_numpy(
        batch, enc.image_size, enc.mean, enc.std)).max() == 0.0


def test_preprocess_rejects_bad_input(tiny: FeatureEncoder) -> None:
    with pytest.raises(ValueError, match="uint8"):
        tiny.preprocess(np.zeros((1, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="RGB"):
        tiny.preprocess([np.zeros((8, 8, 4), dtype=np.uint8)])
    with pytest.raises(ValueError, match="no images"):
        tiny.preprocess([])


def test_encode_images_batches(tiny: FeatureEncoder) -> None:
    images = list(_rand_images(5, 40, 40, seed=9))
    full = encode_images(tiny, images, batch_size=16)
    chunked = encode_images(tiny, images, batch_size=2)
    assert set(full) == set(tiny.output_names)
    for key in full:
        assert full[key].dtype == np.float32 and full[key].shape[0] == 5
        np.testing.assert_allclose(full[key], chunked[key], atol=1e-5)


# --------------------------------------------------------------------------- text


def test_text_features_normalized(tiny: FeatureEncoder) -> None:
    prompts = ["a photo of a flawless hazelnut", "a photo of a damaged hazelnut", "a cropped photo"]
    with torch.inference_mode():
        feats = tiny.encode_text(prompts)
    assert feats.shape == (3, tiny.global_dim)
    np.testing.assert_allclose(feats.norm(dim=-1).numpy(), 1.0, atol=1e-5)
    assert not torch.allclose(feats[0], feats[1])


# --------------------------------------------------------------------------- ONNX export


@pytest.mark.parametrize("which", ["tiny", "lite"])
def test_onnx_export_dynamic_batch(
    which: str, tiny: FeatureEncoder, lite: FeatureEncoder
) -> None:
    """Export at batch 2 (under no_grad: the MHA fast-path trap), run ORT at batch 3."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    enc = tiny if which == "tiny" else lite
    names = list(enc.output_names)
    size = enc.image_size
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            enc, (torch.randn(2, 3, size, size),), buf, input_names=["pixels"],
            output_names=names, opset_version=ONNX_OPSET, dynamo=False,
            dynamic_axes={"pixels": {0: "batch"}, **{n: {0: "batch"} for n in names}},
        )
    model = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(model)
    assert [o.name for o in model.graph.output] == names
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    x = enc.preprocess(_rand_images(3, size + 5, size - 3, seed=11))
    got = sess.run(names, {"pixels": x.numpy()})
    ref = _forward(enc, x)
    for name, arr in zip(names, got):
        assert arr.shape == ref[name].shape
        np.testing.assert_allclose(arr, ref[name], atol=ONNX_ATOL, rtol=0)


# --------------------------------------------------------------------------- local checkpoints


@pytest.fixture(scope="module")
def registered_vit(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Register a tiny ViT config under a ViT-style name (in memory; site-packages untouched)."""
    import open_clip

    cfg_dir = tmp_path_factory.mktemp("open_clip_cfg")
    (cfg_dir / f"{TEST_VIT_NAME}.json").write_text(json.dumps(TEST_VIT_CONFIG))
    open_clip.add_model_config(cfg_dir)
    assert TEST_VIT_NAME in open_clip.list_models()
    return TEST_VIT_NAME


def test_tiny_checkpoint_roundtrip(tiny: FeatureEncoder, tmp_path: Path) -> None:
    path = tmp_path / "tiny.pt"
    torch.save(tiny.model.state_dict(), path)
    loaded = build_encoder(replace(TINY_SPEC, checkpoint=str(path), seed=99))
    x = tiny.preprocess(_rand_images(2, 64, 64, seed=5))
    a, b = _forward(tiny, x), _forward(loaded, x)
    for key in tiny.output_names:
        np.testing.assert_array_equal(a[key], b[key])


def test_named_vit_with_local_checkpoint(registered_vit: str, tmp_path: Path) -> None:
    """The sd15 path: open_clip model *name* + a local checkpoint file (or local-dir folder)."""
    spec = EncoderSpec(kind="open_clip", image_size=64, model_name=registered_vit, seed=0)
    source = build_encoder(spec)
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(source.model.state_dict(), path)
    from_file = build_encoder(replace(spec, checkpoint=str(path), seed=5))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TEST_VIT_CONFIG}))
    from_dir = build_encoder(replace(spec, checkpoint=str(tmp_path), seed=6))
    x = source.preprocess(_rand_images(2, 80, 64, seed=2))
    ref = _forward(source, x)
    for enc in (from_file, from_dir):
        got = _forward(enc, x)
        for key in source.output_names:
            np.testing.assert_array_equal(ref[key], got[key])
    np.testing.assert_allclose(source.encode_text(["a photo"]).numpy(),
                               from_file.encode_text(["a photo"]).numpy(), atol=0)


def test_missing_checkpoint_names_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = PROFILES["sd15"].encoder
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        build_encoder(replace(spec, checkpoint="/nonexistent/o2n/clip.pt"))
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="hf download org/model"):
        build_encoder(replace(spec, checkpoint="hf-hub:org/model"))


def test_encode_images_progress_bar_changes_nothing_but_stderr(tiny: FeatureEncoder, capsys) -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(5)]
    quiet = encode_images(tiny, images, batch_size=2)
    shown = encode_images(tiny, images, batch_size=2, progress="encode")
    assert quiet.keys() == shown.keys() and all(np.array_equal(quiet[k], shown[k]) for k in quiet)
    assert "encode" in capsys.readouterr().err


# --------------------------------------------------------------------------- Lite variants, layers, tiles


@pytest.mark.parametrize("kind,channels", [("efficientnet_lite1", 40 + 112), ("efficientnet_lite2", 48 + 120)])
def test_lite1_lite2_load_their_weights(kind: str, channels: int, photos: list[np.ndarray]) -> None:
    """Lite1/Lite2 map their packages' state dicts exactly and classify real photos confidently."""
    from o2n_edge.encoders.efficientnet import lite_weights_path

    enc = build_encoder(replace(LITE_SPEC, kind=kind))
    source = torch.load(lite_weights_path(kind), map_location="cpu", weights_only=True)
    mapped = map_state_dict(source, enc.model)
    assert len(mapped) == len(enc.model.state_dict())
    assert enc.patch_dim == channels and enc.grid == (28, 28)
    with torch.inference_mode():
        probs = enc.classify(enc.preprocess(photos)).softmax(-1)
    assert float(probs.max(-1).values.mean()) > 0.2  # a random or half-mapped net stays near 1/1000


def test_layers_and_aggregation_options(lite: FeatureEncoder) -> None:
    enc = build_encoder(replace(LITE_SPEC, layers=(1, 2, 3), aggregation=1))
    assert enc.patch_dim == 24 + 40 + 80 and enc.grid == (56, 56)
    assert enc.describe()["layers"] == [1, 2, 3] and enc.describe()["aggregation"] == 1
    x = lite.preprocess(_rand_images(1, 224, 224, seed=3))
    with torch.inference_mode():
        same = build_encoder(replace(LITE_SPEC, layers=(2, 4), aggregation=3))(x)["patch"]
        np.testing.assert_array_equal(same.numpy(), lite(x)["patch"].numpy())
    for bad in [dict(layers=(4, 2)), dict(layers=(0,)), dict(aggregation=2)]:
        with pytest.raises(ValueError):
            build_encoder(replace(LITE_SPEC, **bad))


def test_tiled_encoding_stitches_tiles(lite: FeatureEncoder) -> None:
    """A 2x2-tiled encoder feeds tiles of its input size and returns one grid per image."""
    enc = build_encoder(replace(LITE_SPEC, tiles=2, tile_overlap=0.25))
    assert enc.input_size == 384 and enc.layout.count == 4
    images = list(_rand_images(2, 300, 400, seed=5))
    assert tuple(enc.preprocess(images).shape) == (8, 3, 224, 224)
    out = encode_images(enc, images, batch_size=1)
    assert out["patch"].shape == (2, 48, 48, 152) and out["global"].shape == (2, enc.global_dim)
    # the top-left tile's interior cells are that tile's own features
    with torch.inference_mode():
        first = enc(enc.preprocess(images[:1])[:1])["patch"].numpy()[0]
    # encode_images ran the traced graph on onnxruntime: float32 noise of 1e-5, not bits
    np.testing.assert_allclose(out["patch"][0, :20, :20], first[:20, :20], rtol=1e-4, atol=1e-4)
