"""Bundle format: atomic writing, refusal of any tampered/missing/stray file, torch-free runtime
imports, and the TensorRT engine cache key (everything that runs without TensorRT)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from o2n_edge.runtime.bundle_writer import BundleWriter
from o2n_edge.runtime.bundle import (
    SCHEMA_VERSION,
    BundleError,
    load_bundle,
    verify_bundle,
)
from o2n_edge.runtime import engine_cache as ec
from o2n_edge.runtime.manifest import ModelEntry

ROOT = Path(__file__).resolve().parents[1]


def _write(out: Path, force: bool = False) -> Path:
    """A small but complete bundle: a fake graph with external data, arrays, a JSON aux file."""
    src = out.parent / "src"
    src.mkdir(exist_ok=True)
    (src / "unet.onnx").write_bytes(b"not really onnx" * 10)
    (src / "unet.onnx.data").write_bytes(os.urandom(300))
    (src / "unet.onnx.data").chmod(0o600)  # as onnx writes it
    (src / "image_encoder.onnx").write_bytes(b"graph-bytes")
    with BundleWriter(out, force=force) as w:
        w.add_file("unet.onnx", src / "unet.onnx")  # brings unet.onnx.data along
        w.add_file("image_encoder.onnx", src / "image_encoder.onnx")
        w.add_array("prompt_embeds", np.arange(12, dtype=np.float32).reshape(1, 3, 4))
        w.add_array("memory_bank", np.ones((5, 8), dtype=np.float16))
        w.add_json("extra/notes.json", {"k": 1})
        w.write_manifest({
            "profile": "tiny", "category": "pcb", "image_size": 32, "diffusion_image_size": 32,
            "shots": {"images": ["a.png"], "seed": 0}, "prompt": "a photo of sks pcb",
            "strength": 0.5, "steps": 2, "steps_run": 1, "scheduler": {"timesteps": [999, 499]},
            "fusion": {"weights": {"personalized": 1.0}}, "threshold": {"value": np.float32(0.5),
            "method": "quantile", "quantile": 0.99},
            "models": {"unet": {"file": "unet.onnx"}, "image_encoder": {"file": "image_encoder.onnx"}},
        })
    return out


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    return _write(tmp_path / "bundle")


def test_write_and_load(bundle: Path) -> None:
    b = load_bundle(bundle)
    m = b.manifest
    assert m["schema_version"] == SCHEMA_VERSION
    assert (bundle / "unet.onnx.data").stat().st_mode & 0o777 == (bundle / "unet.onnx").stat().st_mode & 0o777
    assert set(m["files"]) == {"unet.onnx", "unet.onnx.data", "image_encoder.onnx",
                               "prompt_embeds.npy", "memory_bank.npy", "extra/notes.json"}
    assert m["threshold"]["value"] == 0.5
    for pkg in ("o2n-edge", "torch", "diffusers", "onnx", "onnxruntime"):
        assert m["versions"][pkg], pkg
    assert b.array("prompt_embeds").shape == (1, 3, 4)
    assert b.array("memory_bank").dtype == np.float16
    assert b.has_array("memory_bank") and not b.has_array("text_features")
    assert b.model_path("unet") == bundle.resolve() / "unet.onnx"
    assert verify_bundle(bundle) == []
    # no leftovers beside the bundle
    assert sorted(p.name for p in bundle.parent.iterdir()) == ["bundle", "src"]


def test_every_file_is_protected(bundle: Path, tmp_path: Path) -> None:
    """Flip one byte of each file (manifest included) in a copy: refused, naming the file."""
    names = [p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()]
    assert "manifest.json" in names and len(names) == 7
    for name in names:
        copy = tmp_path / f"copy-{name.replace('/', '_')}"
        shutil.copytree(bundle, copy)
        data = bytearray((copy / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (copy / name).write_bytes(bytes(data))
        with pytest.raises(BundleError) as err:
            load_bundle(copy)
        assert name in str(err.value), (name, str(err.value))


def test_missing_and_stray_files(bundle: Path, tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    shutil.copytree(bundle, gone)
    (gone / "memory_bank.npy").unlink()
    with pytest.raises(BundleError, match="memory_bank.npy: missing"):
        load_bundle(gone)

    stray = tmp_path / "stray"
    shutil.copytree(bundle, stray)
    (stray / "extra" / "evil.npy").write_bytes(b"x")
    with pytest.raises(BundleError, match="extra/evil.npy: extra file"):
        load_bundle(stray)

    # engines/ is built on the target and may hold anything
    engines = tmp_path / "engines_ok"
    shutil.copytree(bundle, engines)
    (engines / "engines").mkdir()
    (engines / "engines" / "unet-0123.plan").write_bytes(b"plan")
    assert verify_bundle(engines) == []

    nomani = tmp_path / "nomanifest"
    shutil.copytree(bundle, nomani)
    (nomani / "manifest.json").unlink()
    with pytest.raises(BundleError, match="missing manifest.json"):
        load_bundle(nomani)
    with pytest.raises(BundleError, match="not a directory"):
        load_bundle(tmp_path / "nowhere")


def test_manifest_problems(bundle: Path, tmp_path: Path) -> None:
    def variant(name: str, edit) -> Path:
        d = tmp_path / name
        shutil.copytree(bundle, d)
        m = json.loads((d / "manifest.json").read_text())
        (d / "manifest.json").write_text(edit(m) if callable(edit) else edit)
        return d

    bad_json = variant("badjson", "{not json")
    assert any("malformed" in p for p in verify_bundle(bad_json))
    old = variant("old", lambda m: json.dumps({**m, "schema_version": SCHEMA_VERSION + 1}))
    assert any("schema_version" in p for p in verify_bundle(old))
    escape = variant("escape", lambda m: json.dumps(
        {**m, "files": {**m["files"], "../outside": {"sha256": "0" * 64, "bytes": 1}}}))
    assert any("../outside" in p for p in verify_bundle(escape))
    dangling = variant("dangling", lambda m: json.dumps(
        {**m, "models": {**m["models"], "vae_decoder": {"file": "vae_decoder.onnx"}}}))
    assert any("vae_decoder.onnx" in p for p in verify_bundle(dangling))
    edited = variant("edited", lambda m: json.dumps({**m, "threshold": {**m["threshold"], "value": 0.9}}))
    assert any("manifest.json" in p and "manifest_sha256" in p for p in verify_bundle(edited))
    notdict = variant("list", "[1, 2]")
    assert any("malformed" in p for p in verify_bundle(notdict))


def test_atomic_write_and_force(tmp_path: Path) -> None:
    out = tmp_path / "b"
    with pytest.raises(RuntimeError, match="boom"):
        with BundleWriter(out) as w:
            w.add_array("memory_bank", np.zeros(3))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # neither out_dir nor a temp dir

    with pytest.raises(RuntimeError, match="write_manifest"):
        with BundleWriter(out) as w:
            w.add_array("memory_bank", np.zeros(3))
    assert list(tmp_path.iterdir()) == []

    _write(out)
    first = json.loads((out / "manifest.json").read_text())
    with pytest.raises(FileExistsError):
        with BundleWriter(out) as w:
            pass
    # a failing forced rewrite leaves the old bundle untouched
    with pytest.raises(RuntimeError, match="boom"):
        with BundleWriter(out, force=True) as w:
            w.add_array("memory_bank", np.zeros(3))
            raise RuntimeError("boom")
    assert json.loads((out / "manifest.json").read_text()) == first
    assert verify_bundle(out) == []
    _write(out, force=True)
    assert verify_bundle(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "src"]

    with BundleWriter(tmp_path / "c") as w:
        with pytest.raises(ValueError):
            w.add_array("../escape", np.zeros(1))
        with pytest.raises(TypeError):
            w.add_array("objs", np.array([{}], dtype=object))
        w.write_manifest({})
        with pytest.raises(RuntimeError, match="sealed"):
            w.add_array("late", np.zeros(1))


def test_runtime_imports_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import o2n_edge.runtime.bundle, o2n_edge.runtime.engine_cache\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'onnx', 'tensorrt')"
        " and sys.modules[m] is not None]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


PROFILE = {"sample": {"min": [1, 4, 8, 8], "opt": [2, 4, 8, 8], "max": [4, 4, 8, 8]},
           "timestep": {"min": [1], "opt": [2], "max": [4]}}
BASE = dict(onnx_path_or_sha="a" * 64, precision=["fp16"], profiles=[PROFILE], trt_version="10.9.0",
            gpu_name="NVIDIA Orin", compute_capability=(8, 7), jetpack="R36.4.0")


def test_engine_key_changes_with_every_input(tmp_path: Path) -> None:
    base = ec.engine_key(**BASE)
    assert base.compute_capability == "8.7"
    assert ec.engine_key(**BASE).digest() == base.digest()  # deterministic
    # profile dict order does not matter, values do
    reordered = {k: PROFILE[k] for k in reversed(list(PROFILE))}
    assert ec.engine_key(**{**BASE, "profiles": [reordered]}).digest() == base.digest()
    changes = {
        "onnx_path_or_sha": "b" * 64,
        "precision": ["fp32"],
        "trt_version": "10.10.0",
        "gpu_name": "NVIDIA H100",
        "compute_capability": (9, 0),
        "jetpack": None,
    }
    digests = {base.digest()}
    for field_name, value in changes.items():
        d = ec.engine_key(**{**BASE, field_name: value}).digest()
        assert d not in digests, field_name
        digests.add(d)
    for inp in PROFILE:
        for which, batch in (("min", 2), ("opt", 3), ("max", 5)):  # each keeps min<=opt<=max
            prof = json.loads(json.dumps(PROFILE))
            prof[inp][which][0] = batch
            d = ec.engine_key(**{**BASE, "profiles": [prof]}).digest()
            assert d not in digests, (inp, which)
            digests.add(d)
    two = ec.engine_key(**{**BASE, "profiles": [PROFILE, PROFILE]}).digest()
    assert two not in digests
    with pytest.raises(ValueError, match="min <= opt <= max"):
        ec.engine_key(**{**BASE, "profiles": [{"x": {"min": [4], "opt": [1], "max": [8]}}]})

    # a graph path is hashed, including its external data file
    g = tmp_path / "m.onnx"
    g.write_bytes(b"graph")
    k1 = ec.engine_key(**{**BASE, "onnx_path_or_sha": g})
    (tmp_path / "m.onnx.data").write_bytes(b"weights")
    k2 = ec.engine_key(**{**BASE, "onnx_path_or_sha": g})
    assert k1.onnx_sha256 != k2.onnx_sha256


def test_plan_sidecar_roundtrip(tmp_path: Path) -> None:
    key = ec.engine_key(**BASE)
    plan = ec.plan_path(tmp_path, "unet", key)
    assert ec.find_plan(tmp_path, "unet", key) is None
    ec.write_plan(plan, b"serialized-engine", key, extra={"build_s": 1.0})
    assert ec.check_plan(plan, key) == []
    assert ec.find_plan(tmp_path, "unet", key) == plan
    other = ec.engine_key(**{**BASE, "trt_version": "10.10.0"})
    problems = ec.check_plan(plan, other)
    assert problems and "trt_version" in problems[0]
    plan.write_bytes(b"serialized-engin")  # truncated
    assert any("sha256" in p for p in ec.check_plan(plan, key))
    ec.sidecar_path(plan).write_text("{")
    assert any("malformed" in p for p in ec.check_plan(plan, key))


def test_find_plans_on_this_device(tmp_path: Path, monkeypatch) -> None:
    """The runtime's look-up: plans of any precision/profile whose key matches this device."""
    monkeypatch.setattr(ec, "tensorrt_version", lambda: "10.9.0")
    monkeypatch.setattr(ec, "gpu_info", lambda device=0: ("NVIDIA Orin", "8.7"))
    monkeypatch.setattr(ec, "jetpack_version", lambda *a: "R36.4.0")
    here = ec.device_key("a" * 64, ["fp16"], [PROFILE])
    assert here == ec.engine_key(**BASE)
    ec.write_plan(ec.plan_path(tmp_path, "unet", here), b"p1", here)
    fp32 = ec.engine_key(**{**BASE, "precision": []})
    ec.write_plan(ec.plan_path(tmp_path, "unet", fp32), b"p2", fp32)
    elsewhere = ec.engine_key(**{**BASE, "gpu_name": "NVIDIA H100"})
    ec.write_plan(ec.plan_path(tmp_path, "unet", elsewhere), b"p3", elsewhere)
    found = ec.find_plans(tmp_path, "unet", "a" * 64)
    assert sorted(k.precision for _, k in found) == [(), ("fp16",)]
    assert ec.find_plans(tmp_path, "unet", "b" * 64) == []
    monkeypatch.setattr(ec, "gpu_info", lambda device=0: None)
    assert ec.device_key("a" * 64, ["fp16"], [PROFILE]) is None
    assert ec.find_plans(tmp_path, "unet", "a" * 64) == []


def test_jetpack_version(tmp_path: Path) -> None:
    rel = tmp_path / "nv_tegra_release"
    rel.write_text("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64\n")
    assert ec.jetpack_version(rel) == "R36.4.0"
    assert ec.jetpack_version(tmp_path / "absent") is None


def test_tensorrt_unavailable_is_clear(bundle: Path) -> None:
    pytest.importorskip("torch")  # the builder lives in the export package
    from o2n_edge.export import tensorrt_build as tb

    if ec.tensorrt_version() is not None and ec.gpu_info() is not None:
        pytest.skip("TensorRT and a GPU are present")
    with pytest.raises(tb.TensorRTUnavailable, match=r"o2n-edge\[trt\]"):
        tb.build_engines(bundle)
    providers = tb.ort_tensorrt_provider_options(bundle / "engines", profile=PROFILE)
    name, opts = providers[0]
    assert name == "TensorrtExecutionProvider"
    assert opts["trt_profile_max_shapes"] == "sample:4x4x8x8,timestep:4"
    assert opts["trt_engine_cache_enable"] and opts["trt_fp16_enable"]
    assert providers[-1] == "CPUExecutionProvider"
    # profiles_for: a new batch range replaces axis 0 only
    (p,) = tb.profiles_for(ModelEntry(trt_profiles=[PROFILE]), batch_range=(2, 4, 8))
    assert p["sample"] == {"min": [2, 4, 8, 8], "opt": [4, 4, 8, 8], "max": [8, 4, 8, 8]}
