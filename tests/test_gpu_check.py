"""The GPU check's verdicts, pinned with stand-in pipelines and providers (no GPU is needed here).

Each test stands in for what only a GPU box has (a CUDA/TensorRT onnxruntime, native engines) and
checks that the check tells the truth: all graphs native, engine files present, results written per
backend as each ends, NOT CHECKED never counted as passed, a skipped GPU test failing on demand.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks import gpu_check as gc
from o2n_edge.runtime import pipeline as pl
from o2n_edge.runtime import trt_session
from o2n_edge.runtime.trt_session import TrtSession

ROOT = Path(__file__).resolve().parents[1]
ALL_PROVIDERS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
GRAPHS = ("image_encoder", "vae_encoder", "unet", "vae_decoder")


class _Session:
    def __init__(self, provider: str) -> None:
        self.provider = provider

    def get_providers(self) -> list[str]:
        return [self.provider, "CPUExecutionProvider"]


def _native() -> TrtSession:
    return TrtSession.__new__(TrtSession)  # a real TrtSession type, nothing on a device


def _fake_pipeline(kinds: dict[str, dict[str, object]], crash_on: str | None = None) -> type:
    """An OrtPipeline stand-in: per backend, the session each graph gets; scores equal the CPU's."""

    class Pipe:
        def __init__(self, bundle, options=None) -> None:  # noqa: ANN001
            backend = options.backend if options else "cpu"
            if backend == crash_on:
                raise SystemExit("killed by its budget")  # what `timeout` does to the stage
            self.manifest = {"precision": "fp32"}
            self.sessions = kinds.get(backend, {g: _Session("CPUExecutionProvider") for g in GRAPHS})

        def inspect_batch(self, images):  # noqa: ANN001, ANN202
            return [SimpleNamespace(score=0.5 + i) for i, _ in enumerate(images)]

    return Pipe


@pytest.fixture()
def gpu_box(monkeypatch: pytest.MonkeyPatch):
    """Stand-ins for a GPU box: onnxruntime lists every provider, TensorRT and its builder are there."""
    import onnxruntime as ort

    from o2n_edge.runtime import providers

    monkeypatch.setattr(ort, "get_available_providers", lambda: list(ALL_PROVIDERS))
    monkeypatch.setattr(trt_session, "trt_available", lambda: (True, "ok"))
    tb = SimpleNamespace(build_engines=lambda bundle: {})
    monkeypatch.setitem(sys.modules, "o2n_edge.export.tensorrt_build", tb)
    engines: dict[str, list[Path]] = {g: [Path(f"{g}.engine")] for g in GRAPHS}
    monkeypatch.setattr(providers, "ort_trt_engine_files", lambda bundle, name: engines[name])
    return engines


def _run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kinds: dict, offline: bool = False,
         crash_on: str | None = None) -> dict:
    monkeypatch.setattr(pl, "OrtPipeline", _fake_pipeline(kinds, crash_on))
    results = tmp_path / "gpu_check.json"
    gc.stage_backends(results, tmp_path, "tiny", offline, images=lambda: [0, 1])
    return gc.load(results)["checks"]


def _good() -> dict[str, dict[str, object]]:
    return {"cuda": {g: _Session("CUDAExecutionProvider") for g in GRAPHS},
            "tensorrt": {g: _Session("TensorrtExecutionProvider") for g in GRAPHS},
            "trt-native": {g: _native() for g in GRAPHS}}


def test_trt_native_passes_only_when_every_graph_is_native(gpu_box, monkeypatch, tmp_path: Path) -> None:
    """A working box passes trt-native (TrtSession reports "TensorRT (native)", not "TrtSession");
    one graph left on the CUDA EP fails it: all graphs must be native, not any."""
    checks = _run(monkeypatch, tmp_path, _good())
    assert {n: c["status"] for n, c in checks.items()} == {f"tiny:{b}": gc.PASSED for b in gc.BACKENDS}
    mixed = _good()
    mixed["trt-native"]["unet"] = _Session("CUDAExecutionProvider")
    checks = _run(monkeypatch, tmp_path / "mixed", mixed)
    assert checks["tiny:trt-native"]["status"] == gc.FAILED and "unet" in checks["tiny:trt-native"]["reason"]


def test_tensorrt_ep_with_zero_nodes_fails(gpu_box, monkeypatch, tmp_path: Path) -> None:
    """Sessions whose first provider is the TensorRT EP but no engine file for a model: it took none of its nodes."""
    gpu_box["unet"] = []
    checks = _run(monkeypatch, tmp_path, _good())
    assert checks["tiny:tensorrt"]["status"] == gc.FAILED
    assert "zero" in checks["tiny:tensorrt"]["reason"] and "unet" in checks["tiny:tensorrt"]["reason"]


def test_each_backend_is_on_disk_before_the_next_starts(gpu_box, monkeypatch, tmp_path: Path) -> None:
    """A stage killed during the TensorRT EP's engine builds leaves the CUDA verdict behind."""
    with pytest.raises(SystemExit):
        _run(monkeypatch, tmp_path, _good(), crash_on="tensorrt")
    checks = gc.load(tmp_path / "gpu_check.json")["checks"]
    assert checks["tiny:cuda"]["status"] == gc.PASSED and "tiny:tensorrt" not in checks
    # the script then records the killed stage; it does not overwrite a verdict a stage wrote itself
    gc.record(tmp_path / "gpu_check.json", "backends:tiny", gc.FAILED, "timed out after its 110 s budget")
    gc.record(tmp_path / "gpu_check.json", "tiny:cuda", gc.PASSED, only_if_missing=True)
    assert gc.load(tmp_path / "gpu_check.json")["checks"]["backends:tiny"]["status"] == gc.FAILED


def test_offline_box_reports_not_checked_never_passed(monkeypatch, tmp_path: Path) -> None:
    """CPU onnxruntime, no TensorRT: offline every GPU backend is NOT CHECKED with the reason, online FAILED;
    the summary exits 1 and names them."""
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(trt_session, "trt_available", lambda: (False, "the tensorrt package is not installed"))
    checks = _run(monkeypatch, tmp_path, {}, offline=True)
    assert {c["status"] for c in checks.values()} == {gc.NOT_CHECKED}
    assert "onnxruntime-gpu not installed" in checks["tiny:cuda"]["reason"]
    assert "sdist" in checks["tiny:trt-native"]["reason"]
    assert gc.summary(tmp_path / "gpu_check.json") == 1
    assert "NOT CHECKED: tiny:cuda" in (tmp_path / "gpu_check.md").read_text()
    online = _run(monkeypatch, tmp_path / "online", {}, offline=False)
    assert {c["status"] for c in online.values()} == {gc.FAILED}


def test_summary_exit_codes(tmp_path: Path) -> None:
    results = tmp_path / "r.json"
    assert gc.summary(results) == 1  # nothing checked is not a pass
    gc.record(results, "doctor", gc.PASSED)
    assert gc.summary(results) == 0
    gc.record(results, "triton", gc.FAILED, "instances not on the GPU")
    assert gc.summary(results) == 1 and "failed: triton" in (tmp_path / "r.md").read_text()


def test_script_refuses_clearly_without_a_gpu(tmp_path: Path) -> None:
    """Where no GPU is visible the script says so within seconds, checks nothing and exits 2."""
    env = {**os.environ, "PATH": str(tmp_path)}  # no nvidia-smi on PATH
    res = subprocess.run(["/bin/bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                         text=True, check=False, timeout=30)
    assert res.returncode == 2
    assert "no NVIDIA GPU visible" in res.stderr and "nothing was checked" in res.stderr


def test_script_header_budgets_fit_eight_minutes() -> None:
    """The stage budgets the script runs with add up to at most 480 s (sd15 is opt-in)."""
    import re

    text = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    budgets = [int(b) for name, b in re.findall(r"^\s*(?:\[.*\] && )?stage (\S+) (\d+) ", text, re.M)
               if name != "backends:sd15"]
    assert sum(budgets) <= 480, budgets
    assert "pypi.nvidia.com" in text and "sdist" in text  # the tensorrt-cu12 install note


def test_require_gpu_turns_a_gpu_skip_into_a_failure(tmp_path: Path) -> None:
    """O2N_REQUIRE_GPU=1: a skipped gpu-marked test fails; unmarked skips and the default stay skips."""
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a GPU\n")
    (tmp_path / "test_x.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.gpu\n@pytest.mark.skipif(True, reason='no NVIDIA GPU visible')\ndef test_gpu():\n    pass\n\n"
        "@pytest.mark.skip(reason='not a gpu test')\ndef test_other():\n    pass\n")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", str(tmp_path)]
    base = {k: v for k, v in os.environ.items() if k != "O2N_REQUIRE_GPU"}
    res = subprocess.run(cmd, cwd=tmp_path, env={**base, "O2N_REQUIRE_GPU": "1"}, capture_output=True, text=True)
    assert res.returncode == 1 and "1 skipped" in res.stdout, res.stdout  # a setup-time skip fails as an error
    assert "1 failed" in res.stdout or "1 error" in res.stdout, res.stdout
    assert "no NVIDIA GPU visible" in res.stdout
    res = subprocess.run(cmd, cwd=tmp_path, env=base, capture_output=True, text=True)
    assert res.returncode == 0 and "2 skipped" in res.stdout, res.stdout
