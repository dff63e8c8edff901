"""End to end on real photos: tiny export -> verified bundle -> torch-free runtime -> CLI and server.

One tiny bundle (all three branches, personalized on 2 hazelnut shots) is exported once per
session (the ``tiny_bundle`` fixture in conftest.py, shared with the Triton tests); every test
below uses it. This is where the non-negotiables are pinned: the bundle
verifies and a tampered one is refused, the runtime never imports torch, and runtime scores match
the torch reference image by image and in AUROC on the real test set.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from o2n_edge.cli import app

runner = CliRunner()
# Runtime vs torch reference, per image. Without the personalized branch they agree to ~1e-5;
# with it, the normal version is rounded to uint8 (the picture the operator sees), so a 1e-6
# difference in the graphs can move a pixel by one level, which moves a score by up to ~1e-3.
SCORE_ATOL = 2e-3
AUROC_ATOL = 0.005  # image AUROC through the runtime vs the reference


def test_bundle_has_every_graph_and_passes_validation(tiny_bundle) -> None:
    m = tiny_bundle.manifest
    assert set(m["models"]) == {"image_encoder", "vae_encoder", "vae_decoder", "unet"}
    for name, entry in m["models"].items():
        assert entry["validation"], name
        assert max(entry["validation"].values()) <= entry["tolerance"], name
    assert m["scoring"]["branches"] == ["personalized", "pool", "text"]
    assert m["transform"]["steps_run"] == len(m["transform"]["timesteps"])
    assert m["threshold"]["method"].startswith("quantile") and np.isfinite(m["threshold"]["value"])
    assert tiny_bundle.parity["max_abs"] < SCORE_ATOL, tiny_bundle.parity


def test_inspect_verifies_and_refuses_a_tampered_copy(tiny_bundle, tmp_path: Path) -> None:
    res = runner.invoke(app, ["inspect", str(tiny_bundle.bundle)])
    assert res.exit_code == 0 and "verified" in res.output, res.output
    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle.bundle, bad)
    arr = bad / "memory_bank.npy"
    data = bytearray(arr.read_bytes())
    data[-1] ^= 0xFF
    arr.write_bytes(bytes(data))
    res = runner.invoke(app, ["inspect", str(bad)])
    assert res.exit_code == 1 and "REFUSED" in res.output and "memory_bank.npy" in res.output
    res = runner.invoke(app, ["infer", "--bundle", str(bad), str(bad / "manifest.json")])
    assert res.exit_code == 2 and "memory_bank.npy" in res.output


def test_runtime_runs_without_torch(tiny_bundle, shared_data: Path) -> None:
    """The runtime in a subprocess where `import torch` fails: it loads, transforms and scores."""
    image = sorted((shared_data / "hazelnut_toy/hazelnut/test/colour").glob("*.jpg"))[0]
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from o2n_edge.runtime.pipeline import OrtPipeline\n"
        "from o2n_edge.data.images import load_image\n"
        f"p = OrtPipeline({str(tiny_bundle.bundle)!r})\n"
        f"r = p.inspect(load_image({str(image)!r}))\n"
        "assert r.normal is not None and r.anomaly_map.shape == (p.image_size, p.image_size)\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print(r.score)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    from o2n_edge.data.images import load_image
    from o2n_edge.runtime.pipeline import OrtPipeline

    in_process = OrtPipeline(tiny_bundle.bundle).inspect(load_image(image)).score
    assert abs(float(out.stdout.strip().splitlines()[-1]) - in_process) < 1e-9


def test_runtime_matches_torch_reference_on_the_test_set(tiny_bundle, shared_data: Path) -> None:
    """Scores image by image and image AUROC, runtime vs the torch reference, on real data."""
    from o2n_edge.data import load_dataset, load_image
    from o2n_edge.data.preprocess import resize_uint8
    from o2n_edge.diffusion import load_run, one_to_normal
    from o2n_edge.encoders import build_encoder, encode_images
    from o2n_edge.detection_metrics import image_auroc
    from o2n_edge.profiles import get_profile
    from o2n_edge.runtime.bundle import load_bundle
    from o2n_edge.runtime.pipeline import OrtPipeline
    from o2n_edge.runtime.scoring import Reference, ScoringConfig, score

    bundle = load_bundle(tiny_bundle.bundle)
    m = bundle.manifest
    s = m["scoring"]
    config = ScoringConfig.from_manifest(s)
    ref = Reference.from_manifest(s, bundle.array("memory_bank"), bundle.array("global_bank"),
                                  bundle.array("text_features"))
    ds = load_dataset(shared_data / "hazelnut_toy", "mvtec", "hazelnut")
    size = m["image_size"]
    images = np.stack([load_image(x.path, size) for x in ds.test])
    encoder = build_encoder(get_profile("tiny").encoder)
    run = load_run(_run_dir(tiny_bundle), device="cpu")
    normals = resize_uint8(one_to_normal(run, images, seed=m["transform"]["seed"]).normals, size)
    expected = score(encode_images(encoder, images), ref, config, encode_images(encoder, normals)).scores

    got = np.array([r.score for r in OrtPipeline(tiny_bundle.bundle).inspect_batch(list(images))])
    np.testing.assert_allclose(got, expected, atol=SCORE_ATOL, rtol=0)
    assert abs(image_auroc(ds.labels, got) - image_auroc(ds.labels, expected)) <= AUROC_ATOL


def _run_dir(summary) -> Path:
    return summary.bundle.parent / "runs" / "export-mvtec-hazelnut-tiny-k2-s0"


def test_infer_cli_json_maps_and_bad_files(tiny_bundle, shared_data: Path, tmp_path: Path) -> None:
    good = sorted((shared_data / "hazelnut_toy/hazelnut/test/good").glob("*.jpg"))[0]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(good.read_bytes()[:500])
    res = runner.invoke(app, ["infer", "--bundle", str(tiny_bundle.bundle), str(good), str(broken), "--json",
                              "--save-maps", str(tmp_path / "maps")])
    assert res.exit_code == 1  # one unreadable image
    rows = json.loads(res.output[res.output.index("["):])
    assert rows[0]["decision"] in ("normal", "anomalous") and Path(rows[0]["map"]).is_file()
    assert "error" in rows[1] and "broken.jpg" in rows[1]["error"]


def test_server_with_the_real_pipeline(tiny_bundle, shared_data: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from o2n_edge.runtime.pipeline import OrtPipeline
    from o2n_edge.runtime.results_log import ResultsLog
    from o2n_edge.runtime.server import create_app

    log = ResultsLog(tmp_path / "r.db")
    client = TestClient(create_app(OrtPipeline(tiny_bundle.bundle), log))
    img = sorted((shared_data / "hazelnut_toy/hazelnut/test/colour").glob("*.jpg"))[0]
    r = client.post("/v1/inspect?views=1", files={"image": (img.name, img.read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["bundle_hash"] == tiny_bundle.manifest["manifest_sha256"]
    assert {"vae_encode", "unet_step_0", "vae_decode", "image_encoder", "scoring"} <= set(body["timings_ms"])
    assert set(body["views"]) >= {"query", "normal", "overlay"}
    assert log.count() == 1
    assert client.post("/v1/inspect", content=b"", headers={"content-type": "image/png"}).status_code == 400
    assert log.count() == 1


def test_export_sd15_classes_at_tiny_size(shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sd15 path (diffusers checkpoint + CLIP text encoder + LoRA + open_clip ViT) exports and verifies.

    The checkpoint and the ViT are tiny random models of the production classes, so every shape,
    LoRA fuse and export path of sd15 runs here in seconds.
    """
    from dataclasses import replace

    from o2n_edge import profiles
    from sd15_fixtures import make_tiny_sd15_checkpoint
    from o2n_edge.export.build import ExportOptions, export_bundle
    from o2n_edge.runtime.bundle import verify_bundle

    ckpt = make_tiny_sd15_checkpoint(tmp_path / "sd15")
    sd15 = profiles.PROFILES["sd15"]
    small = replace(sd15, encoder=replace(sd15.encoder, model_name="tiny", image_size=64),
                    diffusion=replace(sd15.diffusion, image_size=32, pool_size=2))
    monkeypatch.setitem(profiles.PROFILES, "sd15", small)
    summary = export_bundle(ExportOptions(
        category="hazelnut", out=tmp_path / "bundle", profile="sd15", data=shared_data / "hazelnut_toy",
        shots=1, runs_dir=tmp_path / "runs", personalize_steps=2, distill_steps=1, base_model=ckpt, progress=False,
        lcm_lora=""))  # "" = distil by LCD (the LCM-LoRA merge is tested from hub ids in test_hub.py)
    m = summary.manifest
    assert m["profile"] == "sd15" and m["prompt"] == "a photo of sks hazelnut"
    assert m["diffusion"]["student"]["method"] == "lcd"
    assert set(m["models"]) == {"image_encoder", "vae_encoder", "vae_decoder", "unet"}
    assert m["models"]["unet"]["inputs"]["encoder_hidden_states"]["shape"][1:] == list(
        np.load(summary.bundle / "prompt_embeds.npy").shape[1:])
    assert verify_bundle(summary.bundle) == []
    assert summary.parity["max_abs"] < SCORE_ATOL, summary.parity


def test_bank_search_on_onnxruntime_and_numpy_agree(tiny_bundle, shared_data: Path) -> None:
    """On the CPU the pipeline searches the bank with numpy by default (its BLAS is faster there);
    the ORT graph (what a GPU provider runs) gives the same scores."""
    from o2n_edge.data import load_dataset, load_image
    from o2n_edge.runtime.bank_search import NumpyBankSearch, OrtBankSearch
    from o2n_edge.runtime.pipeline import OrtPipeline, SessionOptions

    ds = load_dataset(shared_data / "hazelnut_toy", "mvtec", "hazelnut")
    images = [load_image(x.path) for x in ds.test[:6]]
    ort_pipe = OrtPipeline(tiny_bundle.bundle, SessionOptions(bank_search="onnxruntime"))
    np_pipe = OrtPipeline(tiny_bundle.bundle)
    assert isinstance(ort_pipe.scorer.search, OrtBankSearch)
    assert isinstance(np_pipe.scorer.search, NumpyBankSearch)
    got = np.array([r.score for r in ort_pipe.inspect_batch(images)])
    expected = np.array([r.score for r in np_pipe.inspect_batch(images)])
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="bank_search"):
        OrtPipeline(tiny_bundle.bundle, SessionOptions(bank_search="faiss"))


def test_variants_study_compares_against_the_reference(tiny_bundle, shared_data: Path, tmp_path: Path) -> None:
    """Same bundle twice: zero cost; an int8 copy: scored, its cost and score change reported."""
    from benchmarks.variants import quantized_overrides
    from benchmarks.variants import Variant, variants_study

    b = Path(tiny_bundle.bundle)
    doc = variants_study([Variant("fp32", b), Variant("again", b), Variant("int8", b, quantized_overrides(b, cache_dir=tmp_path))],
                         shared_data / "hazelnut_toy", None, "hazelnut", threads=1)
    ref, again, int8 = doc["rows"]
    assert doc["test_images"] == len(ref["scores"]) > 0 and doc["has_masks"]
    assert 0.0 <= ref["image_auroc"] <= 1.0 and 0.0 <= ref["pixel_auroc"] <= 1.0
    assert again["image_auroc_cost"] == 0.0 and again["max_abs_score_diff"] == 0.0
    assert int8["graphs_swapped"] == ["image_encoder", "unet"] and int8["max_abs_score_diff"] > 0.0


def test_profile_coreset_default_and_override(tiny_bundle, shared_data: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A profile's coreset ratio shrinks the exported bank; --coreset 1 keeps it whole; bad ratios are refused."""
    from dataclasses import replace

    from o2n_edge import profiles
    from o2n_edge.export.build import ExportOptions, export_bundle

    monkeypatch.setitem(profiles.PROFILES, "tiny", replace(profiles.PROFILES["tiny"], coreset_ratio=0.5))
    common = dict(category="hazelnut", profile="tiny", data=shared_data / "hazelnut_toy", shots=2, seed=0,
                  run_dir=_run_dir(tiny_bundle), pool_size=2, progress=False)
    full_rows = json.loads((tiny_bundle.bundle / "manifest.json").read_text())["memory_bank"]["rows"]
    half = json.loads((export_bundle(ExportOptions(out=tmp_path / "half", **common)).bundle
                       / "manifest.json").read_text())["memory_bank"]
    assert half["coreset"]["ratio"] == 0.5 and half["rows"] == round(full_rows * 0.5)
    whole = json.loads((export_bundle(ExportOptions(out=tmp_path / "whole", coreset_ratio=1.0, **common)).bundle
                        / "manifest.json").read_text())["memory_bank"]
    assert whole["rows"] == full_rows and whole["coreset"]["ratio"] == 1.0
    for bad in ("0", "1.5"):
        res = runner.invoke(app, ["export", "--category", "hazelnut", "--profile", "tiny", "--data",
                                  str(shared_data / "hazelnut_toy"), "--coreset", bad, "--out", str(tmp_path / bad)])
        assert res.exit_code != 0 and "--coreset must be a fraction in (0, 1]" in res.output, res.output
        assert not (tmp_path / bad).exists()


def test_static_int8_qdq_graphs_are_calibrated_cached_and_run(tiny_bundle, shared_data: Path, tmp_path: Path) -> None:
    """Calibrated QDQ int8 graphs: real QuantizeLinear nodes, reused from the cache, and the runtime scores with them."""
    import onnx

    from o2n_edge.bench.latency import open_ort
    from o2n_edge.data import load_dataset, load_image
    from benchmarks.variants import static_int8_overrides

    ds = load_dataset(shared_data / "hazelnut_toy", "mvtec", "hazelnut")
    calib = [load_image(p) for p in ds.train_good[-3:]]
    paths = static_int8_overrides(tiny_bundle.bundle, calib, tmp_path)
    assert set(paths) == {"unet", "image_encoder"}
    for p in paths.values():
        ops = {n.op_type for n in onnx.load(str(p)).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    stamp = {n: p.stat().st_mtime_ns for n, p in paths.items()}
    again = static_int8_overrides(tiny_bundle.bundle, calib, tmp_path)
    assert again == paths and {n: p.stat().st_mtime_ns for n, p in again.items()} == stamp
    other = static_int8_overrides(tiny_bundle.bundle, calib[:2], tmp_path)  # new calibration set -> new graphs
    assert other["unet"] != paths["unet"]
    pipe, _ = open_ort(tiny_bundle.bundle, 1, overrides=paths)
    scores = [r.score for r in pipe.inspect_batch([load_image(s.path) for s in ds.test[:3]])]
    assert np.all(np.isfinite(scores))


def test_pool_size_zero_is_shots_only_without_diffusion(shared_data: Path, tmp_path: Path) -> None:
    """`--branches pool --pool-size 0` is the shots-only baseline: nothing is personalized."""
    from o2n_edge.export.build import ExportOptions, export_bundle

    summary = export_bundle(ExportOptions(
        category="hazelnut", out=tmp_path / "bundle", profile="tiny", data=shared_data / "hazelnut_toy",
        shots=2, seed=0, runs_dir=tmp_path / "runs", branches="pool", pool_size=0, progress=False))
    assert not (tmp_path / "runs").exists()
    assert set(summary.manifest["models"]) == {"image_encoder"}


def test_lite_export_has_no_diffusion(shared_data: Path, tmp_path: Path) -> None:
    """lite is the memory-bank detector: a generated pool or the transform is refused in one line."""
    from o2n_edge.export.build import ExportOptions, export_bundle

    for extra in ({"pool_size": 4}, {"branches": "personalized,pool"}):
        with pytest.raises(ValueError, match="profile 'lite' has no diffusion model .*--profile tiny or sd15"):
            export_bundle(ExportOptions(category="hazelnut", out=tmp_path / "b", profile="lite",
                                        data=shared_data / "hazelnut_toy", progress=False, **extra))
    assert not (tmp_path / "b").exists()
