"""Execution setup without a GPU: the TensorRT 10/11 build switch (stand-in modules), the TensorRT
EP options the pipeline passes, and the install checks behind `o2n-edge doctor` (stand-in metadata)."""

from __future__ import annotations

import importlib.metadata as metadata
from pathlib import Path
from types import SimpleNamespace

import pytest

from o2n_edge.runtime import pipeline as pl
from o2n_edge.runtime import providers as pv
from o2n_edge.runtime.manifest import BundleManifest, ModelEntry

PROFILE = {"sample": {"min": [1, 4, 32, 32], "opt": [1, 4, 32, 32], "max": [4, 4, 32, 32]},
           "timestep": {"min": [1], "opt": [1], "max": [4]}}


def _fake_trt(version: str, strongly_typed_bit: int | None = 1) -> SimpleNamespace:
    """A stand-in ``tensorrt`` module: version and the flag enums the recipe reads."""
    creation = SimpleNamespace() if strongly_typed_bit is None else SimpleNamespace(STRONGLY_TYPED=strongly_typed_bit)
    return SimpleNamespace(__version__=version, NetworkDefinitionCreationFlag=creation,
                           BuilderFlag=SimpleNamespace(FP16=0, PREFER_PRECISION_CONSTRAINTS=1))


@pytest.fixture()
def tb():
    pytest.importorskip("torch")  # the builder lives in the export package
    from o2n_edge.export import tensorrt_build

    return tensorrt_build


def test_tensorrt_11_builds_strongly_typed_from_the_graph_types(tb) -> None:
    r = tb.build_recipe(_fake_trt("11.4.0.106"), "fp16", "fp16")
    assert r.strongly_typed and r.builder_flags == () and not r.constrain_norms and r.network_flags == 1 << 1
    assert tb.build_recipe(_fake_trt("11.0.0"), "fp32", "fp32").builder_flags == ()
    # an fp32 bundle cannot give fp16 engines on 11.x: refused with the export command that can
    with pytest.raises(tb.EngineBuildError, match=r"strongly typed.*--precision fp16"):
        tb.build_recipe(_fake_trt("11.4.0.106"), "fp16", "fp32")


def test_tensorrt_10_keeps_weak_typing_for_fp32_graphs_and_strong_for_fp16(tb) -> None:
    weak = tb.build_recipe(_fake_trt("10.3.0"), "fp16", "fp32")
    assert not weak.strongly_typed and weak.builder_flags == ("FP16",) and weak.constrain_norms
    assert weak.network_flags == 0
    strong = tb.build_recipe(_fake_trt("10.16.1.11"), "fp16", "fp16")
    assert strong.strongly_typed and strong.builder_flags == () and strong.network_flags == 1 << 1
    # a 10.x without the strongly-typed flag: the FP16 flag honours the fp16 graph
    old = tb.build_recipe(_fake_trt("10.0.1", strongly_typed_bit=None), "fp16", "fp16")
    assert old.builder_flags == ("FP16",) and not old.constrain_norms
    assert tb.build_recipe(_fake_trt("10.3.0"), "fp32", "fp32").builder_flags == ()
    with pytest.raises(ValueError, match="precision"):
        tb.build_recipe(_fake_trt("10.3.0"), "int8", "fp32")


def test_tensorrt_backend_passes_caches_profile_and_precision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--backend tensorrt`: engine + timing caches beside the bundle's engines, its profile, fp16 from the bundle."""
    import onnxruntime as ort

    seen: dict = {}

    class Session:
        def __init__(self, path, sess_options=None, providers=None, **kw):  # noqa: ANN001
            seen["path"], seen["providers"] = path, providers

    monkeypatch.setattr(ort, "InferenceSession", Session)
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    bundle = SimpleNamespace(path=tmp_path, model_path=lambda n: tmp_path / f"{n}.onnx",
                             ort_disabled_optimizers=lambda n: [])
    pipe = pl.OrtPipeline.__new__(pl.OrtPipeline)
    pipe.bundle, pipe.options = bundle, pl.SessionOptions(backend="tensorrt")
    bundle.manifest_data = BundleManifest(precision="fp16", models={"unet": ModelEntry(trt_profiles=[PROFILE])})
    pipe._session("unet")
    (trt_name, opts), (cuda_name, _), (cpu_name, _) = seen["providers"]
    assert (trt_name, cuda_name, cpu_name) == ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    cache = tmp_path / "engines" / pv.ORT_TRT_CACHE  # engines per model (checkable), one timing cache
    assert opts["trt_engine_cache_enable"] and opts["trt_engine_cache_path"] == str(cache / "unet")
    assert opts["trt_timing_cache_enable"] and opts["trt_timing_cache_path"] == str(cache) and cache.is_dir()
    assert pv.ort_trt_engine_files(tmp_path, "unet") == []
    (cache / "unet" / "TensorrtExecutionProvider_TRTKernel_graph_x_0_0_fp16_sm90.engine").write_bytes(b"e")
    assert [p.name for p in pv.ort_trt_engine_files(tmp_path, "unet")] == [
        "TensorrtExecutionProvider_TRTKernel_graph_x_0_0_fp16_sm90.engine"]
    assert opts["trt_fp16_enable"] is True
    assert opts["trt_profile_min_shapes"] == "sample:1x4x32x32,timestep:1"
    assert opts["trt_profile_max_shapes"] == "sample:4x4x32x32,timestep:4"
    # an fp32 bundle runs fp32; a user override wins
    bundle.manifest_data = BundleManifest(precision="fp32", models={"unet": ModelEntry(trt_profiles=[PROFILE])})
    pipe.options = pl.SessionOptions(backend="tensorrt", provider_options={
        "TensorrtExecutionProvider": {"trt_max_workspace_size": 1 << 30}})
    pipe._session("unet")
    opts = seen["providers"][0][1]
    assert opts["trt_fp16_enable"] is False and opts["trt_max_workspace_size"] == 1 << 30
    # the cpu backend gets no TensorRT options at all
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    pipe.options = pl.SessionOptions(backend="cpu")
    pipe._session("unet")
    assert seen["providers"] == [("CPUExecutionProvider", {})]


def _versions(installed: dict[str, str]):
    def version(name: str) -> str:
        if name not in installed:
            raise metadata.PackageNotFoundError(name)
        return installed[name]
    return version


def test_install_problems_name_the_exact_fix() -> None:
    both = pv.install_problems(["CPUExecutionProvider"], gpu_visible=True,
                               version=_versions({"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"}))
    assert [p.fix for p in both] == [pv.FIX_BOTH]
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'o2n-edge[gpu]'" in both[0].line()
    cpu_only = pv.install_problems(["CPUExecutionProvider"], gpu_visible=True, version=_versions({"onnxruntime": "1.32.0"}))
    assert [p.fix for p in cpu_only] == [pv.FIX_NO_GPU_PACKAGE]
    broken = pv.install_problems(["CPUExecutionProvider"], gpu_visible=True, version=_versions({"onnxruntime-gpu": "1.31.1"}))
    assert [p.fix for p in broken] == [pv.FIX_GPU_BROKEN]
    fine = pv.install_problems(["CUDAExecutionProvider", "CPUExecutionProvider"], gpu_visible=True,
                               version=_versions({"onnxruntime-gpu": "1.31.1"}))
    assert fine == []
    assert pv.install_problems(["CPUExecutionProvider"], gpu_visible=False, version=_versions({"onnxruntime": "1.32.0"})) == []
    none = pv.install_problems([], gpu_visible=False, version=_versions({}))
    assert "o2n-edge[cpu]" in none[0].fix


def test_doctor_exits_1_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from o2n_edge.cli import app
    from o2n_edge.runtime import engine_cache

    monkeypatch.setattr(metadata, "version", _versions({"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"}))
    monkeypatch.setattr(engine_cache, "gpu_info", lambda device=0: ("NVIDIA H200", "9.0"))
    res = CliRunner().invoke(app, ["doctor"])
    assert res.exit_code == 1
    assert "both onnxruntime 1.32.0 and onnxruntime-gpu 1.31.1 are installed" in res.output
    assert pv.FIX_BOTH in res.output
    monkeypatch.setattr(metadata, "version", _versions({"onnxruntime": "1.32.0"}))
    monkeypatch.setattr(engine_cache, "gpu_info", lambda device=0: None)
    res = CliRunner().invoke(app, ["doctor"])
    assert res.exit_code == 0 and "ok: CPU execution" in res.output


def test_cpu_fallback_log_names_the_fix(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import onnxruntime as ort

    from o2n_edge.runtime import engine_cache

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(metadata, "version", _versions({"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"}))
    monkeypatch.setattr(engine_cache, "gpu_info", lambda device=0: ("NVIDIA H200", "9.0"))
    with caplog.at_level("WARNING"):
        assert pl.resolve_providers("cuda") == ["CPUExecutionProvider"]
    assert "falling back to CPUExecutionProvider" in caplog.text and pv.FIX_BOTH in caplog.text


def test_deploy_files_install_extras_that_exist() -> None:
    """The Dockerfiles cannot be built here: at least what they COPY and the extras they install exist."""
    import re
    import tomllib

    root = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "onnxruntime" not in " ".join(tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"])
    assert extras["cpu"] == ["onnxruntime==1.32.0"] and extras["gpu"][0].startswith("onnxruntime-gpu==")
    for name in ("Dockerfile.cuda", "Dockerfile.jetson"):
        text = (root / "runtime" / "deploy" / name).read_text()
        for src in re.findall(r"^COPY (.+) /src/", text, flags=re.M):
            assert all((root / s).exists() for s in src.split()), (name, src)
        for group in re.findall(r'/src\[([a-z,]+)\]', text):
            assert set(group.split(",")) <= set(extras), (name, group)
