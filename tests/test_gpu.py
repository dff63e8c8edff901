"""GPU-marked tests: they run on an NVIDIA machine (benchmarks/gpu_check.sh runs them) and skip elsewhere.

A tiny bundle is exported here (profile tiny, seconds) and run on the CUDA EP, the TensorRT EP
(with the bundle's caches) and native engines built by the installed TensorRT (10 or 11).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from o2n_edge.runtime.engine_cache import gpu_info

pytestmark = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(gpu_info() is None, reason="no NVIDIA GPU visible (these run from benchmarks/gpu_check.sh)")
ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_refuses_clearly_without_a_gpu(tmp_path: Path) -> None:
    """Where no GPU is visible, the prepared script says so and checks nothing (exit 2)."""
    if gpu_info() is not None:
        pytest.skip("a GPU is visible here")
    env = {**os.environ, "PATH": str(tmp_path)}  # no nvidia-smi on PATH
    res = subprocess.run(["/bin/bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                         text=True, check=False)
    assert res.returncode == 2
    assert "no NVIDIA GPU visible" in res.stderr and "nothing was checked" in res.stderr


@pytest.fixture(scope="module")
def tiny(shared_data: Path, tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("torch")
    from o2n_edge.data import load_dataset, load_image
    from o2n_edge.export.build import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("gpu")
    bundles = {}
    for precision in ("fp32", "fp16"):
        bundles[precision] = export_bundle(ExportOptions(
            category="hazelnut", out=root / precision, profile="tiny", data=shared_data / "hazelnut_toy", shots=2,
            runs_dir=root / "runs", pool_size=1, personalize_steps=4, distill_steps=1, precision=precision,
            progress=False)).bundle
    ds = load_dataset(shared_data / "hazelnut_toy", "mvtec", "hazelnut")
    return bundles, [load_image(x.path) for x in ds.test[:4]]


def _scores(bundle: Path, images: list, backend: str) -> tuple[np.ndarray, object]:
    from o2n_edge.runtime.pipeline import OrtPipeline, SessionOptions

    pipe = OrtPipeline(bundle, SessionOptions(backend=backend))
    return np.array([r.score for r in pipe.inspect_batch(images)]), pipe


@needs_gpu
def test_cuda_provider_is_used_and_matches_cpu(tiny) -> None:
    bundles, images = tiny
    cpu, _ = _scores(bundles["fp32"], images, "cpu")
    gpu, pipe = _scores(bundles["fp32"], images, "cuda")
    assert all(s.get_providers()[0] == "CUDAExecutionProvider" for s in pipe.sessions.values())
    np.testing.assert_allclose(gpu, cpu, atol=5e-3)


@needs_gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_native_engines_build_and_match_cpu(tiny, precision: str) -> None:
    pytest.importorskip("tensorrt")
    from o2n_edge.export.tensorrt_build import build_engines

    bundles, images = tiny
    reports = build_engines(bundles[precision])
    assert set(reports) == {"image_encoder", "vae_encoder", "vae_decoder", "unet"}
    assert all(Path(r.plan).is_file() for r in reports.values())
    again = build_engines(bundles[precision])
    assert all(r.cached for r in again.values())  # the cache key holds
    cpu, _ = _scores(bundles[precision], images, "cpu")
    trt, pipe = _scores(bundles[precision], images, "trt-native")
    assert any(type(s).__name__ == "TrtSession" for s in pipe.sessions.values())
    np.testing.assert_allclose(trt, cpu, atol=5e-2 if precision == "fp16" else 5e-3)


@needs_gpu
def test_tensorrt_ep_caches_engines_beside_the_bundle(tiny) -> None:
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no TensorRT EP")
    bundles, images = tiny
    cpu, _ = _scores(bundles["fp16"], images, "cpu")
    trt, pipe = _scores(bundles["fp16"], images, "tensorrt")
    assert pipe.sessions["unet"].get_providers()[0] == "TensorrtExecutionProvider"
    cache = bundles["fp16"] / "engines" / "ort-trt"
    assert any(cache.iterdir()), "the TensorRT EP wrote no engine/timing cache"
    np.testing.assert_allclose(trt, cpu, atol=5e-2)


def test_gpu_check_reports_cpu_fallback_as_failure(tiny_fp32, tmp_path: Path) -> None:
    """The check itself, where no GPU is: every GPU backend is reported as NOT on its provider (exit 1),
    nothing is silently counted as a pass."""
    if gpu_info() is not None:
        pytest.skip("a GPU is visible here: gpu_check.sh runs the real thing")
    import json

    from o2n_edge.bench.gpu_check import BACKENDS, run_check

    bundle, data, rels = tiny_fp32
    from o2n_edge.data import load_image
    from o2n_edge.runtime.pipeline import OrtPipeline

    scores = [float(OrtPipeline(bundle).inspect(load_image(data / r)).score) for r in rels]
    stage = tmp_path / "runtime_fp32.json"
    stage.write_text(json.dumps({"info": {"images_paths": rels, "scores": scores}}))
    assert run_check(bundle, stage, data, tmp_path / "out") == 1
    doc = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert not doc["ok"] and not doc["checks"]["build_engines"]["ok"]
    for backend in BACKENDS:
        assert doc["checks"][backend]["ok"] is False and "error" in doc["checks"][backend], backend
    assert "| cuda | NO |" in (tmp_path / "out" / "gpu_check.md").read_text()


@pytest.fixture(scope="module")
def tiny_fp32(shared_data: Path, tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("torch")
    from o2n_edge.export.build import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("gpucheck")
    bundle = export_bundle(ExportOptions(
        category="hazelnut", out=root / "b", profile="tiny", data=shared_data / "hazelnut_toy", shots=1,
        runs_dir=root / "runs", pool_size=1, personalize_steps=2, distill_steps=1, progress=False)).bundle
    return bundle, shared_data / "hazelnut_toy", ["hazelnut/test/good/04.jpg", "hazelnut/test/colour/00.jpg"]
