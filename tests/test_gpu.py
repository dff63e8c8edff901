"""GPU-marked tests: they run on an NVIDIA machine (benchmarks/gpu_check.sh runs them) and skip elsewhere.

With O2N_REQUIRE_GPU=1 (the GPU check sets it) a skip here is a failure (tests/conftest.py).

A tiny bundle is exported here (profile tiny, seconds) and run on the CUDA EP, the TensorRT EP
(with the bundle's caches) and native engines built by the installed TensorRT (10 or 11).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from o2n_edge.runtime.engine_cache import gpu_info

pytestmark = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(gpu_info() is None, reason="no NVIDIA GPU visible (these run from benchmarks/gpu_check.sh)")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """Tiny fp32 + fp16 bundles of the built-in textile set and 4 of its test images.

    The GPU check passes the bundles it already exported (``O2N_GPU_TINY``: tiny-fp32/, tiny-fp16/);
    elsewhere they are exported here (needs only the package: no data folder).
    """
    from o2n_edge.data import load_dataset, load_image

    given = os.environ.get("O2N_GPU_TINY")
    bundles = {}
    if given:
        bundles = {p: Path(given) / f"tiny-{p}" for p in ("fp32", "fp16")}
        bundles = {p: b for p, b in bundles.items() if (b / "manifest.json").is_file()}
    missing = [p for p in ("fp32", "fp16") if p not in bundles]
    if missing:
        pytest.importorskip("torch")
        from o2n_edge.export.build import ExportOptions, export_bundle

        root = tmp_path_factory.mktemp("gpu")
        for precision in missing:
            bundles[precision] = export_bundle(ExportOptions(
                category="textile", dataset="textile", out=root / precision, profile="tiny", shots=2,
                runs_dir=root / "runs", pool_size=1, personalize_steps=4, distill_steps=1, precision=precision,
                progress=False)).bundle
    ds = load_dataset(None, "textile", "textile")
    return bundles, [load_image(x.path) for x in list(ds.test)[:4]]


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
    assert all(type(s).__name__ == "TrtSession" for s in pipe.sessions.values())  # every graph native
    np.testing.assert_allclose(trt, cpu, atol=5e-2 if precision == "fp16" else 5e-3)


@needs_gpu
def test_tensorrt_ep_caches_engines_beside_the_bundle(tiny) -> None:
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no TensorRT EP")
    bundles, images = tiny
    cpu, _ = _scores(bundles["fp16"], images, "cpu")
    trt, pipe = _scores(bundles["fp16"], images, "tensorrt")
    from o2n_edge.runtime.providers import ort_trt_engine_files

    assert all(s.get_providers()[0] == "TensorrtExecutionProvider" for s in pipe.sessions.values())
    empty = [n for n in pipe.sessions if not ort_trt_engine_files(bundles["fp16"], n)]
    assert not empty, f"the TensorRT EP built no engine for {empty} (it took none of their nodes)"
    np.testing.assert_allclose(trt, cpu, atol=5e-2)
