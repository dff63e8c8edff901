"""The typed bundle manifest: exact round trip of what the exporter writes, refusals that name the
key, and the writer/loader going through the one schema."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from o2n_edge.runtime.bundle_writer import BundleWriter
from o2n_edge.runtime.bundle import load_bundle
from o2n_edge.runtime.manifest import (
    SCHEMA_VERSION,
    BundleError,
    BundleManifest,
    ModelEntry,
    load_manifest,
    manifest_digest,
)


def _full() -> dict:
    """Every section the exporter writes, shaped as it writes them (a personalized lite bundle)."""
    tensor = {"shape": ["batch", 4, 8, 8], "dtype": "float32"}
    m = {
        "schema_version": SCHEMA_VERSION,
        "files": {"unet.onnx": {"sha256": "a" * 64, "bytes": 10},
                  "image_encoder.onnx": {"sha256": "b" * 64, "bytes": 11},
                  "memory_bank.npy": {"sha256": "c" * 64, "bytes": 12}},
        "profile": "lite", "category": "tire", "dataset": "mvtec", "image_size": 224,
        "decode": {"jpeg_draft": True}, "precision": "fp16",
        "shots": {"images": ["000.png", "001.png"], "seed": 0, "k": 2},
        "encoder": {"encoder": "EfficientNetLiteEncoder", "image_size": 224, "mean": [0.5, 0.5, 0.5],
                    "std": [0.25, 0.25, 0.25], "has_text": False, "patch_dim": 64, "global_dim": 32,
                    "grid": [28, 28], "output_names": ["patch", "global"],
                    "tiling": {"tile": 224, "tiles": 1, "step": 0}, "kind": "lite0", "layers": [2, 3],
                    "aggregation": 3, "spec": {"layers": [2, 3]}},
        "scoring": {"branches": ["personalized", "pool"], "weights": {"personalized": 1.0, "pool": 0.5},
                    "image_size": 224, "topk_fraction": 0.01, "global_weight": 0.0, "smoothing_sigma": 4.0,
                    "neighborhood": 3, "norm": {"pool": [0.1, 2.0]}, "ring_norm": {}},
        "fusion": {"weights": {"pool": 0.5}, "norm": {"pool": [0.1, 2.0]}, "selection": {"method": "x"}},
        "memory_bank": {"rows": 100, "dim": 64, "coreset": {"ratio": 1.0}, "pool_size": 0},
        "threshold": {"value": 1.25, "method": "quantile", "quantile": 0.99, "n_images": 3,
                      "images": ["a.png", "b.png", "c.png"]},
        "models": {"unet": {"file": "unet.onnx", "inputs": {"sample": tensor, "timestep": {"shape": ["batch"],
                                                                                         "dtype": "int64"}},
                            "outputs": {"out_sample": tensor}, "precision": "fp16", "opset": 17,
                            "validation": {"out_sample": 1e-3}, "tolerance": 0.01,
                            "trt_profiles": [{"sample": {"min": [1, 4, 8, 8]}}],
                            "ort_disabled_optimizers": ["NchwcTransformer"], "extra": {}},
                   "image_encoder": {"file": "image_encoder.onnx"}},
        "diffusion_image_size": 64, "prompt": "a photo of sks tire", "strength": 0.3, "steps": 4,
        "steps_run": 1, "scheduler": {"type": "lcm", "num_train_timesteps": 1000},
        "transform": {"strength": 0.3, "steps": 4, "steps_run": 1, "timesteps": [259], "strength_mode": "lcm",
                      "seed": 0, "keep_low_sigma": 0.0},
        "diffusion": {"kind": "lite", "latent_shape": [4, 8, 8], "student": {}, "vae": None},
        "tuning": {"chosen": {"name": "a"}},
        "versions": {"o2n-edge": "0.1", "torch": None},
        "a_key_from_a_newer_writer": [1, 2],
    }
    m["manifest_sha256"] = manifest_digest(m)
    return m


def test_round_trip_is_exact_and_typed() -> None:
    raw = _full()
    typed = BundleManifest.from_dict(copy.deepcopy(raw))
    assert typed.to_dict() == raw
    assert json.dumps(typed.to_dict(), sort_keys=True) == json.dumps(raw, sort_keys=True)
    assert typed.digest_ok()
    assert typed.threshold is not None and typed.threshold.value == 1.25
    assert typed.files["unet.onnx"].bytes == 10
    assert typed.model("unet").inputs["timestep"].dtype == "int64"
    assert typed.model("vae_decoder") == ModelEntry()  # absent graph: an empty entry, not a KeyError
    assert typed.encoder is not None and typed.encoder.other["kind"] == "lite0"
    assert typed.branches == ("personalized", "pool")
    assert typed.other == {"a_key_from_a_newer_writer": [1, 2]}
    # an absent key stays absent and an explicit null stays null
    minimal = {"schema_version": SCHEMA_VERSION, "files": {}, "manifest_sha256": "0" * 64,
               "encoder": {"tiling": None}}
    assert BundleManifest.from_dict(minimal).to_dict() == minimal


@pytest.mark.parametrize("edit, key", [
    (lambda m: m.pop("files"), "'files'"),
    (lambda m: m.pop("schema_version"), "'schema_version'"),
    (lambda m: m["threshold"].pop("value"), "'threshold.value'"),
    (lambda m: m["threshold"].update(value="high"), "threshold.value: expected a number, got a string"),
    (lambda m: m.update(image_size=True), "image_size: expected an integer, got true or false"),
    (lambda m: m.update(shots=3), "shots: expected an object"),
    (lambda m: m["files"]["unet.onnx"].update(bytes="10"), "files.unet.onnx.bytes"),
    (lambda m: m["models"]["unet"]["inputs"]["sample"].update(shape=[1, 2.5]), "models.unet.inputs.sample.shape[1]"),
    (lambda m: m["transform"].update(timesteps="259"), "transform.timesteps: expected a list"),
    (lambda m: m.update(schema_version=SCHEMA_VERSION + 1), f"schema_version {SCHEMA_VERSION + 1}"),
    (lambda m: m["files"].update({"../up": {"sha256": "0", "bytes": 1}}), "'../up'"),
    (lambda m: m["models"].update(vae_decoder={"file": "vae_decoder.onnx"}), "models.vae_decoder"),
])
def test_refusals_name_the_key(edit, key: str) -> None:
    raw = _full()
    edit(raw)
    with pytest.raises(BundleError) as err:
        BundleManifest.from_dict(raw)
    assert key in str(err.value), str(err.value)
    assert "manifest.json" in str(err.value)


def test_not_an_object_and_digest() -> None:
    with pytest.raises(BundleError, match="top level is not an object"):
        BundleManifest.from_dict([1, 2])
    raw = _full()
    raw["threshold"]["value"] = 9.0
    assert not BundleManifest.from_dict(raw).digest_ok()


def test_writer_validates_and_loader_is_typed(tmp_path: Path) -> None:
    out = tmp_path / "b"
    with pytest.raises(BundleError, match="threshold.value"):
        with BundleWriter(out) as w:
            w.add_array("memory_bank", np.zeros((2, 3), dtype=np.float32))
            w.write_manifest({"threshold": {"value": "high"}})
    assert list(tmp_path.iterdir()) == []  # nothing written
    with BundleWriter(out) as w:
        w.add_array("memory_bank", np.zeros((2, 3), dtype=np.float32))
        written = w.write_manifest({"category": "pcb", "threshold": {"value": np.float32(0.5)},
                                    "shots": {"images": ["a.png"], "seed": 1}})
    b = load_bundle(out)
    assert b.manifest == written == json.loads((out / "manifest.json").read_text())
    assert b.manifest_data.category == "pcb" and b.manifest_data.threshold.value == 0.5
    assert b.manifest_data.shots.seed == 1 and b.manifest_data.shots.k is None
    assert load_manifest(out).to_dict() == written
