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
import threading
from collections.abc import Sequence
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


def _check(err) -> None:  # noqa: ANN001 - a cudaError_t or a (cudaError_t, ...) tuple
    code = err[0] if isinstance(err, tuple) else err
    if int(code) != 0:
        raise RuntimeError(f"CUDA error {code}")


class TrtSession:
    """One deserialized engine; ``run(names or None, {name: array})`` -> outputs by name.

    Why it keeps its device buffers: a cudaMalloc/cudaFree pair per tensor per call costs more
    than a small engine's execution; buffers grow when a larger shape arrives and are freed with
    the session. Why a lock: one execution context, one stream and these buffers are shared, and
    ``serve --workers > 1`` calls ``run`` from several threads. Why ``output_order``: TensorRT
    numbers its I/O tensors in its own order, while callers index ``run(None, ...)`` by the ONNX
    graph's output order (what onnxruntime returns); the bundle's manifest gives that order.
    """

    def __init__(self, plan: str | Path, output_order: Sequence[str] | None = None) -> None:
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
        engine_outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        wanted = list(output_order or [])
        if wanted and sorted(wanted) != sorted(engine_outputs):
            raise RuntimeError(f"{plan}: engine outputs {engine_outputs} differ from the graph's {wanted}")
        self.outputs = wanted or engine_outputs
        err, self.stream = cudart.cudaStreamCreate()
        _check(err)
        self._buffers: dict[str, tuple[int, int]] = {}  # tensor name -> (device pointer, bytes)
        self._lock = threading.Lock()

    def get_providers(self) -> list[str]:
        """onnxruntime's call, answered for the pipeline's logs and the GPU check."""
        return ["TensorRT (native)"]

    def _buffer(self, name: str, nbytes: int) -> int:
        """The device buffer of tensor ``name``, reallocated only when ``nbytes`` outgrows it."""
        ptr, size = self._buffers.get(name, (0, 0))
        if nbytes <= size and ptr:
            return ptr
        if ptr:
            _check(self._cudart.cudaFree(ptr))
        err, ptr = self._cudart.cudaMalloc(max(nbytes, 1))
        _check(err)
        self._buffers[name] = (ptr, max(nbytes, 1))
        return ptr

    def run(self, output_names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Like ``InferenceSession.run``: the named outputs (all, in graph order, for None) as float32."""
        names = list(output_names) if output_names else list(self.outputs)
        unknown = [n for n in names if n not in self.outputs]
        if unknown:
            raise KeyError(f"no outputs {unknown} (engine has {self.outputs})")
        with self._lock:
            return self._run_locked(names, feeds)

    def _run_locked(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        trt, cudart = self._trt, self._cudart
        kind = cudart.cudaMemcpyKind
        for name in self.inputs:
            arr = np.ascontiguousarray(feeds[name].astype(trt.nptype(self.engine.get_tensor_dtype(name)), copy=False))
            self.context.set_input_shape(name, arr.shape)
            ptr = self._buffer(name, arr.nbytes)
            _check(cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, kind.cudaMemcpyHostToDevice, self.stream))
            self.context.set_tensor_address(name, ptr)
        results: dict[str, tuple[np.ndarray, int]] = {}
        for name in self.outputs:  # every output needs an address, even those not asked for
            shape = tuple(self.context.get_tensor_shape(name))
            out = np.empty(shape, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
            ptr = self._buffer(name, out.nbytes)
            self.context.set_tensor_address(name, ptr)
            results[name] = (out, ptr)
        if not self.context.execute_async_v3(self.stream):
            raise RuntimeError("TensorRT execution failed")
        for name in names:
            out, ptr = results[name]
            _check(cudart.cudaMemcpyAsync(out.ctypes.data, ptr, out.nbytes, kind.cudaMemcpyDeviceToHost, self.stream))
        _check(cudart.cudaStreamSynchronize(self.stream))
        return [results[n][0].astype(np.float32, copy=False) for n in names]

    def close(self) -> None:
        """Free the device buffers (also on garbage collection)."""
        buffers, self._buffers = getattr(self, "_buffers", {}), {}
        for ptr, _ in buffers.values():
            self._cudart.cudaFree(ptr)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: CUDA may be gone already
            pass


def native_session(bundle, name: str) -> TrtSession | None:  # noqa: ANN001 - a runtime Bundle
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
    outputs = list(bundle.model_entry(name).outputs or {})  # the graph's output order
    return TrtSession(plans[0][0], output_order=outputs or None)
