"""The GPU path's pieces with stand-in tensorrt / cuda-python / onnxruntime modules (no GPU here).

TrtSession on host memory posing as device memory (ctypes), the doctor against an onnxruntime that
lists CUDA but falls back to the CPU, the timing cache's key and refusal, Triton's instance kind
for plans, and the Jetson image's numpy pin and build-time import check.
"""

from __future__ import annotations

import ctypes
import importlib.metadata as metadata
import logging
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ TrtSession


class FakeCudart:
    """cuda.bindings.runtime on host memory: pointers are ctypes buffers' addresses."""

    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)

    def __init__(self) -> None:
        self.mallocs, self.frees, self.mem = 0, 0, {}

    def cudaStreamCreate(self):  # noqa: ANN201, N802
        return 0, "stream"

    def cudaMalloc(self, n: int):  # noqa: ANN201, N802
        buf = ctypes.create_string_buffer(n)
        self.mem[ctypes.addressof(buf)] = buf
        self.mallocs += 1
        return 0, ctypes.addressof(buf)

    def cudaFree(self, ptr: int):  # noqa: ANN201, N802
        self.mem.pop(ptr)
        self.frees += 1
        return (0,)

    def cudaMemcpyAsync(self, dst: int, src: int, n: int, kind: int, stream: str):  # noqa: ANN201, N802
        ctypes.memmove(dst, src, n)
        return (0,)

    def cudaStreamSynchronize(self, stream: str):  # noqa: ANN201, N802
        return (0,)


class FakeContext:
    """Engine order: x (input), b_out = x + 1, a_out = 2 x. Detects two threads inside at once."""

    def __init__(self) -> None:
        self.shapes, self.addr, self.inside, self.overlaps = {}, {}, 0, 0

    def set_input_shape(self, name: str, shape: tuple) -> None:
        self.shapes[name] = tuple(shape)

    def get_tensor_shape(self, name: str) -> tuple:
        return self.shapes["x"]

    def set_tensor_address(self, name: str, ptr: int) -> None:
        self.addr[name] = ptr

    def execute_async_v3(self, stream: str) -> bool:
        self.inside += 1
        self.overlaps += self.inside > 1
        n = int(np.prod(self.shapes["x"]))
        view = lambda name: np.ctypeslib.as_array((ctypes.c_float * n).from_address(self.addr[name]))  # noqa: E731
        x = view("x").copy()
        time.sleep(0.01)
        view("b_out")[:] = x + 1
        view("a_out")[:] = 2 * x
        self.inside -= 1
        return True


@pytest.fixture()
def fake_trt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    cudart = FakeCudart()
    context = FakeContext()
    names = ["x", "b_out", "a_out"]
    engine = SimpleNamespace(
        num_io_tensors=3, get_tensor_name=names.__getitem__,
        get_tensor_mode=lambda n: "in" if n == "x" else "out", get_tensor_dtype=lambda n: "f32",
        create_execution_context=lambda: context)
    trt = SimpleNamespace(Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None}),
                          Runtime=lambda logger: SimpleNamespace(deserialize_cuda_engine=lambda blob: engine),
                          TensorIOMode=SimpleNamespace(INPUT="in", OUTPUT="out"), nptype=lambda dt: np.float32)
    cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    bindings.runtime, cuda.bindings = cudart, bindings
    for name, mod in {"tensorrt": trt, "cuda": cuda, "cuda.bindings": bindings, "cuda.bindings.runtime": cudart}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"plan")
    return plan, cudart, context


def test_trt_session_reuses_device_buffers(fake_trt) -> None:
    from o2n_edge.runtime.trt_session import TrtSession

    plan, cudart, _ = fake_trt
    sess = TrtSession(plan)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    for _ in range(3):
        sess.run(None, {"x": x})
    assert cudart.mallocs == 3 and cudart.frees == 0  # one buffer per tensor, not per call
    sess.run(None, {"x": np.zeros((4, 3), np.float32)})  # a larger batch grows them once
    assert cudart.mallocs == 6 and cudart.frees == 3


def test_trt_session_outputs_by_name_and_in_graph_order(fake_trt) -> None:
    from o2n_edge.runtime.trt_session import TrtSession

    plan, _, _ = fake_trt
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    (a,) = TrtSession(plan).run(["a_out"], {"x": x})
    np.testing.assert_array_equal(a, 2 * x)
    a, b = TrtSession(plan, output_order=["a_out", "b_out"]).run(None, {"x": x})  # the graph's order
    np.testing.assert_array_equal(a, 2 * x)
    np.testing.assert_array_equal(b, x + 1)


def test_trt_session_is_safe_under_several_workers(fake_trt) -> None:
    from o2n_edge.runtime.trt_session import TrtSession

    plan, _, context = fake_trt
    sess = TrtSession(plan)
    bad = []

    def work(k: int) -> None:
        x = np.full((2, 3), k, np.float32)
        for _ in range(5):
            out = sess.run(None, {"x": x})
            if not np.array_equal(out[-1], 2 * x):
                bad.append(k)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert context.overlaps == 0 and not bad


# ------------------------------------------------------------------------------ doctor


def _fake_ort(session_gets: list[str] | None) -> types.ModuleType:
    """onnxruntime that lists CUDA + TensorRT; its sessions get ``session_gets`` (None: what was asked)."""
    ort = types.ModuleType("onnxruntime")
    ort.__version__ = "1.31.1"
    ort.get_available_providers = lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    ort.SessionOptions = lambda: SimpleNamespace()

    class InferenceSession:
        def __init__(self, path, sess_options=None, providers=None) -> None:  # noqa: ANN001
            assert Path(path).is_file()
            self.providers = list(providers) if session_gets is None else list(session_gets)

        def get_providers(self) -> list[str]:
            return self.providers

    ort.InferenceSession = InferenceSession
    return ort


@pytest.mark.parametrize("falls_back", [True, False])
def test_doctor_creates_sessions_and_sees_a_silent_cpu_fallback(monkeypatch, falls_back: bool) -> None:
    from typer.testing import CliRunner

    from o2n_edge.cli import app
    from o2n_edge.runtime import engine_cache

    monkeypatch.setitem(sys.modules, "onnxruntime", _fake_ort(["CPUExecutionProvider"] if falls_back else None))
    monkeypatch.setattr(metadata, "version", lambda n: "1.31.1" if n == "onnxruntime-gpu" else
                        (_ for _ in ()).throw(metadata.PackageNotFoundError(n)))
    monkeypatch.setattr(engine_cache, "gpu_info", lambda device=0: ("NVIDIA H100", "9.0"))
    res = CliRunner().invoke(app, ["doctor"])
    if falls_back:
        assert res.exit_code == 1, res.output
        assert "CUDAExecutionProvider is listed but a session on it fell back" in res.output
        assert "TensorrtExecutionProvider is listed but" in res.output
    else:
        assert res.exit_code == 0, res.output
        assert "CUDAExecutionProvider: session ok" in res.output


# ------------------------------------------------------------------------------ timing cache


def test_timing_cache_is_keyed_and_a_refused_one_is_replaced(tmp_path: Path, caplog) -> None:
    pytest.importorskip("torch")  # the builder lives in the export package
    from o2n_edge.export import tensorrt_build as tb

    a = tb.timing_cache_path(tmp_path, "10.3.0", "8.7")
    assert a.name == "timing-trt10.3.0-sm87.cache"
    assert len({a, tb.timing_cache_path(tmp_path, "11.4.0.106", "8.7"), tb.timing_cache_path(tmp_path, "10.3.0", "9.0")}) == 3
    a.write_bytes(b"from another GPU")
    calls = []

    class Config:
        def create_timing_cache(self, blob: bytes) -> bytes:
            return blob

        def set_timing_cache(self, cache: bytes, ignore_mismatch: bool) -> bool:
            calls.append(cache)
            return cache == b""  # TensorRT refuses a mismatched cache (returns False)

    with caplog.at_level(logging.WARNING):
        cache = tb._attach_timing_cache(Config(), a)
    assert cache == b"" and calls == [b"from another GPU", b""]
    assert "refused the timing cache" in caplog.text


# ------------------------------------------------------------------------------ Triton, images


def test_tensorrt_plan_instances_are_on_the_gpu_even_for_a_cpu_repository() -> None:
    from o2n_edge.triton.repository import RepositoryOptions, _instance_group

    assert _instance_group(RepositoryOptions(device="cpu"), gpu_only=True) == [{"count": 1, "kind": "KIND_GPU"}]
    assert _instance_group(RepositoryOptions(device="cpu")) == [{"count": 1, "kind": "KIND_CPU"}]


def test_jetson_image_pins_numpy_1_and_checks_its_imports_at_build() -> None:
    text = (ROOT / "runtime" / "deploy" / "Dockerfile.jetson").read_text()
    assert "PIP_CONSTRAINT=" in text and '"numpy>=1.26,<2"' in text
    pin, ort_install = text.index("PIP_CONSTRAINT="), text.index('"onnxruntime-gpu==')
    assert pin < ort_install < text.index("check_image.py --need TensorrtExecutionProvider")
    assert "check_image.py" in (ROOT / "runtime" / "deploy" / "Dockerfile.cuda").read_text()


@pytest.mark.parametrize("case", ["numpy2", "no-trt-ep", "ok"])
def test_image_check_fails_the_build_when_onnxruntime_cannot_serve(tmp_path: Path, case: str) -> None:
    ort = tmp_path / "onnxruntime"
    ort.mkdir()
    if case == "numpy2":
        body = "raise ImportError('A module that was compiled using NumPy 1.x cannot be run in NumPy 2.2.6')\n"
    else:
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] + (["TensorrtExecutionProvider"] if case == "ok" else [])
        body = f"__version__ = '1.23.0'\ndef get_available_providers():\n    return {providers!r}\n"
    (ort / "__init__.py").write_text(body)
    (tmp_path / "tensorrt.py").write_text("__version__ = '10.3.0'\n")
    res = subprocess.run([sys.executable, str(ROOT / "runtime" / "deploy" / "check_image.py"), "--need",
                          "TensorrtExecutionProvider", "--need", "CUDAExecutionProvider", "--tensorrt"],
                         env={"PYTHONPATH": str(tmp_path)}, capture_output=True, text=True, timeout=60)
    assert res.returncode == (0 if case == "ok" else 1), res.stdout + res.stderr
    if case == "numpy2":
        assert "onnxruntime does not import with numpy" in res.stderr
    if case == "ok":
        assert "tensorrt 10.3.0" in res.stdout and "TensorrtExecutionProvider" in res.stdout
