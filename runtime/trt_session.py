"""Native TensorRT engines behind the same ``run(None, feeds)`` call as an ONNX Runtime session.

The pipeline swaps a model's ORT session for a :class:`TrtSession` when a plan built on this
device (``o2n-edge build-engines``) is cached in the bundle's ``engines/`` and its key checks
out (onnx sha256, precision, profiles, TensorRT version, GPU; see ``engine_cache``). Buffers are
moved with cuda-python's runtime bindings (``cuda.bindings.runtime``), not torch, so the runtime
keeps its no-torch rule on the device too.

Status: written against the TensorRT 10 Python API (named I/O tensors, ``execute_async_v3``);
not yet run on a GPU in this project (no GPU was lent). Without tensorrt/cuda-python or an
NVIDIA GPU, :func:`trt_available` says why and the pipeline stays on ONNX Runtime.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("o2n_edge.runtime")


def trt_available() -> tuple[bool, str]:
    """Whether native engines can run here, and if not, why (for the log and the bench tables)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "the tensorrt package is not installed (pip install 'o2n-edge[trt]')"
    try:
        from cuda.bindings import runtime as cudart  # noqa: F401
    except ImportError:
        return False, "cuda-python (cuda.bindings) is not installed"
    from o2n_edge.runtime.engine_cache import gpu_info

    if gpu_info() is None:
        return False, "no NVIDIA GPU is visible"
    return True, "ok"


def _check(err) -> None:
    code = err[0] if isinstance(err, tuple) else err
    if int(code) != 0:
        raise RuntimeError(f"CUDA error {code}")


class TrtSession:
    """One deserialized engine; ``run(None, {name: array})`` -> list of outputs (engine order)."""

    def __init__(self, plan: str | Path) -> None:
        import tensorrt as trt
        from cuda.bindings import runtime as cudart

        self._trt, self._cudart = trt, cudart
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        self.engine = runtime.deserialize_cuda_engine(Path(plan).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {plan}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        err, self.stream = cudart.cudaStreamCreate()
        _check(err)

    def get_providers(self) -> list[str]:
        return ["TensorRT (native)"]

    def _alloc(self, nbytes: int) -> int:
        err, ptr = self._cudart.cudaMalloc(max(nbytes, 1))
        _check(err)
        return ptr

    def run(self, output_names, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        trt, cudart = self._trt, self._cudart
        kind = cudart.cudaMemcpyKind
        buffers = []
        try:
            for name in self.inputs:
                arr = np.ascontiguousarray(feeds[name].astype(trt.nptype(self.engine.get_tensor_dtype(name)), copy=False))
                self.context.set_input_shape(name, arr.shape)
                ptr = self._alloc(arr.nbytes)
                buffers.append(ptr)
                _check(cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, kind.cudaMemcpyHostToDevice, self.stream))
                self.context.set_tensor_address(name, ptr)
            results = []
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                out = np.empty(shape, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
                ptr = self._alloc(out.nbytes)
                buffers.append(ptr)
                self.context.set_tensor_address(name, ptr)
                results.append((out, ptr))
            if not self.context.execute_async_v3(self.stream):
                raise RuntimeError("TensorRT execution failed")
            for out, ptr in results:
                _check(cudart.cudaMemcpyAsync(out.ctypes.data, ptr, out.nbytes, kind.cudaMemcpyDeviceToHost, self.stream))
            _check(cudart.cudaStreamSynchronize(self.stream))
            return [out.astype(np.float32, copy=False) for out, _ in results]
        finally:
            for ptr in buffers:
                cudart.cudaFree(ptr)


def native_session(bundle, name: str):
    """A TrtSession for model ``name`` when a valid cached plan exists for this device, else None."""
    ok, why = trt_available()
    if not ok:
        log.info("native TensorRT not used for %s: %s", name, why)
        return None
    from o2n_edge.runtime.engine_cache import find_plans

    plans = find_plans(bundle.engines_dir, name, bundle.model_path(name))
    if not plans:
        log.warning("no valid TensorRT plan for %s in %s (run o2n-edge build-engines on this device)", name, bundle.engines_dir)
        return None
    return TrtSession(plans[0][0])
