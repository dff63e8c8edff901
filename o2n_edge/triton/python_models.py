"""The logic of the repository's Python-backend models, importable (and testable) without Triton.

Each model's ``1/model.py`` is a few lines (see :data:`MODEL_PY`): it makes the packages
importable, imports ``triton_python_backend_utils`` and subclasses one class from here, handing
it that module as ``pb``. Tests hand in a stand-in instead, so the request handling below runs
in CI with or without a server.

- :class:`InspectModel` (self-contained): the whole ``o2n_edge.runtime`` pipeline on ONNX Runtime
  inside one model, for any Triton that has the Python backend.
- :class:`PipelineModel` (BLS): the same :class:`OrtPipeline` code, but each graph call goes to
  the repository's graph model through Triton (Business Logic Scripting), so Triton batches and
  places the heavy graphs; the numpy scheduler, bank search and scoring run here.
- :class:`GraphModel`: one ONNX graph on ONNX Runtime in a Python-backend model, for a Triton
  without the onnxruntime backend (``--graph-backend python``).

All of them go through the runtime's public API (``OrtPipeline.inspect_batch`` via
``o2n_edge.runtime.worker.inspect_payloads``), so runtime changes carry over.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from o2n_edge.data.images import ImageError
from o2n_edge.runtime.manifest import BundleManifest
from o2n_edge.runtime.types import InspectResult
from o2n_edge.runtime.worker import Payload, inspect_payloads

log = logging.getLogger("o2n_edge.triton")

# Tensor names of the inspect models (the contract with clients; docs/triton.md).
IMAGE_BYTES = "IMAGE"  # TYPE_STRING: encoded image file (PNG, JPEG, ...)
IMAGE_RAW = "IMAGE_RAW"  # TYPE_UINT8 (H, W, 3) RGB
OUT_SCORE = "SCORE"
OUT_DECISION = "DECISION"  # TYPE_BOOL, true = anomalous
OUT_THRESHOLD = "THRESHOLD"
OUT_MAP = "ANOMALY_MAP"  # (S, S) float32 at the scoring size
BUNDLE_DIR = "bundle"  # inside the model's version folder
PARAM_BACKEND = "o2n_backend"  # onnxruntime execution: cpu | cuda | tensorrt | trt-native
PARAM_THREADS = "o2n_threads"
PARAM_BUNDLE_HASH = "bundle_hash"
PARAM_GRAPH_MODELS = "o2n_graph_models"  # BLS: JSON {graph name: Triton model name}
PARAM_GRAPH_FILE = "o2n_graph_file"

# The model.py written into each Python-backend model's version folder. Triton's Python stub
# starts its interpreter with the environment ignored (PYTHONPATH has no effect), so a Triton
# whose Python does not have o2n-edge installed is pointed at a site-packages folder that has
# it through O2N_TRITON_SITE_DIRS (os.pathsep-separated); it goes first on sys.path.
MODEL_PY = '''"""Triton Python-backend model written by `o2n-edge triton`; the logic is {cls} in
o2n_edge.triton.python_models (pip install o2n-edge in Triton's Python, or set
O2N_TRITON_SITE_DIRS to a site-packages folder that has it)."""

import os
import site
import sys

_before = list(sys.path)
for _d in os.environ.get("O2N_TRITON_SITE_DIRS", "").split(os.pathsep):
    if _d:
        site.addsitedir(_d)
sys.path[:] = [p for p in sys.path if p not in _before] + _before

import triton_python_backend_utils as pb_utils  # noqa: E402

from o2n_edge.triton.python_models import {cls} as _Model  # noqa: E402


class TritonPythonModel(_Model):
    pb = pb_utils
'''


def model_parameters(args: dict[str, Any]) -> dict[str, str]:
    """The string parameters of the model's config (``args["model_config"]`` is JSON)."""
    config = json.loads(args["model_config"])
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def version_dir(args: dict[str, Any]) -> Path:
    return Path(args["model_repository"]) / str(args["model_version"])


class _InspectBase:
    """Request handling shared by the two inspect models: payloads in, four outputs out."""

    pb: Any = None  # triton_python_backend_utils (or a stand-in), set by model.py

    pipeline: Any
    bundle_hash: str

    def execute(self, requests: Sequence[Any]) -> list[Any]:
        """One response per request; a bad image fails its own request only.

        Every image of every request Triton batched together goes through one
        ``inspect_batch`` call, so dynamic batching batches the graphs too.
        """
        payloads: list[Payload] = []
        owners: list[tuple[int, int]] = []  # (start, end) in payloads, per request
        errors: dict[int, str] = {}
        for i, request in enumerate(requests):
            start = len(payloads)
            try:
                payloads.extend(self._payloads(request))
            except ImageError as exc:
                errors[i] = str(exc)
            owners.append((start, len(payloads)))
        try:
            names = [f"image {k}" for k in range(len(payloads))]
            results = inspect_payloads(self.pipeline, payloads, names) if payloads else []
        except Exception as exc:  # noqa: BLE001 - a broken graph call must not kill the model
            log.exception("inspection failed")
            message = f"inspection failed: {type(exc).__name__}: {exc}"
            return [self._error(message, invalid=False) for _ in requests]
        responses = []
        for i, (start, end) in enumerate(owners):
            mine = results[start:end]
            bad = [str(r) for r in mine if isinstance(r, ImageError)]
            if i in errors or bad or not mine:
                message = errors.get(i) or "; ".join(bad) or "the request carries no image"
                responses.append(self._error(f"invalid image: {message}", invalid=True))
                continue
            responses.append(self._response([r for r in mine if isinstance(r, InspectResult)]))
        return responses

    def _payloads(self, request: Any) -> list[Payload]:
        """The images of one request: IMAGE (encoded bytes) and/or IMAGE_RAW (uint8 HxWx3)."""
        pb = self.pb
        out: list[Payload] = []
        encoded = pb.get_input_tensor_by_name(request, IMAGE_BYTES)
        if encoded is not None:
            for item in np.asarray(encoded.as_numpy(), dtype=object).reshape(-1):
                if isinstance(item, str):
                    raise ImageError(f"{IMAGE_BYTES} must hold bytes, got text")
                out.append(bytes(item))
        raw = pb.get_input_tensor_by_name(request, IMAGE_RAW)
        if raw is not None:
            arr = raw.as_numpy()
            out.extend(arr[None] if arr.ndim == 3 else list(arr))
        return out

    def _response(self, results: list[InspectResult]) -> Any:
        pb = self.pb
        n = len(results)
        size = int(self.pipeline.image_size)
        maps = np.zeros((n, size, size), np.float32)
        for k, r in enumerate(results):
            if r.anomaly_map is not None:
                maps[k] = r.anomaly_map
        tensors = [
            pb.Tensor(OUT_SCORE, np.array([[r.score] for r in results], np.float32)),
            pb.Tensor(OUT_DECISION, np.array([[r.decision] for r in results], np.bool_)),
            pb.Tensor(OUT_THRESHOLD, np.array([[r.threshold] for r in results], np.float32)),
            pb.Tensor(OUT_MAP, maps),
        ]
        # The bundle hash is the model config's parameter `bundle_hash`. Response parameters were
        # tried and did not reach clients from this wheel's Python backend, so none are sent.
        return pb.InferenceResponse(output_tensors=tensors)

    def _error(self, message: str, invalid: bool) -> Any:
        pb = self.pb
        code = getattr(pb.TritonError, "INVALID_ARG" if invalid else "INTERNAL", None)
        error = pb.TritonError(message, code) if code is not None else pb.TritonError(message)
        return pb.InferenceResponse(output_tensors=[], error=error)

    def finalize(self) -> None:
        self.pipeline = None


def _session_options(params: dict[str, str], args: dict[str, Any], bank_search: str | None = None) -> Any:
    """ONNX Runtime options from the config's parameters; a GPU instance runs on its own GPU."""
    from o2n_edge.runtime.pipeline import SessionOptions

    opts = SessionOptions(
        backend=params.get(PARAM_BACKEND) or "cpu",
        intra_op_threads=int(params.get(PARAM_THREADS) or 0),
    )
    if str(args.get("model_instance_kind", "")).upper() == "GPU":
        device = {"device_id": int(args.get("model_instance_device_id", 0))}
        opts.provider_options = {"CUDAExecutionProvider": device, "TensorrtExecutionProvider": dict(device)}
    if bank_search:
        opts.bank_search = bank_search
    return opts


class InspectModel(_InspectBase):
    """Self-contained: the whole runtime pipeline (ONNX Runtime) inside this model."""

    def initialize(self, args: dict[str, Any]) -> None:
        from o2n_edge.runtime.pipeline import OrtPipeline

        params = model_parameters(args)
        self.pipeline = OrtPipeline(version_dir(args) / BUNDLE_DIR, _session_options(params, args))
        self.bundle_hash = self.pipeline.bundle_hash
        log.info("o2n inspect model loaded bundle %s", self.bundle_hash)


class TritonGraphSession:
    """Looks like an onnxruntime session to :class:`OrtPipeline`; runs a Triton model via BLS."""

    def __init__(self, pb: Any, model_name: str, output_names: Sequence[str],
                 ranks: dict[str, int] | None = None) -> None:
        self.pb = pb
        self.model_name = model_name
        self.output_names = list(output_names)
        self.ranks = ranks or {}  # tensor name -> rank in the graph (batch axis included)

    def run(self, output_names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        pb = self.pb
        names = list(output_names) if output_names else self.output_names
        inputs = []
        for k, v in feeds.items():
            v = np.ascontiguousarray(v)
            if v.ndim == 1:  # per-sample scalar: the config says dims [1] + reshape []
                v = v.reshape(-1, 1)
            inputs.append(pb.Tensor(k, v))
        request = pb.InferenceRequest(
            model_name=self.model_name, requested_output_names=names, inputs=inputs
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"Triton model {self.model_name}: {response.error().message()}")
        outs = []
        for n in names:
            arr = pb.get_output_tensor_by_name(response, n).as_numpy()
            if self.ranks.get(n) == 1 and arr.ndim == 2:
                arr = arr.reshape(-1)
            outs.append(arr)
        return outs

    def get_providers(self) -> list[str]:
        return [f"triton:{self.model_name}"]


class PipelineModel(_InspectBase):
    """BLS: the runtime pipeline's numpy parts here, each graph a call to its Triton model.

    The bank search runs in numpy (``bank_search="numpy"``): it is the one graph-like step that
    is not a repository model, and numpy keeps this model free of an onnxruntime session.
    """

    def initialize(self, args: dict[str, Any]) -> None:
        from o2n_edge.runtime.bundle import load_bundle
        from o2n_edge.runtime.pipeline import OrtPipeline

        params = model_parameters(args)
        graph_models: dict[str, str] = json.loads(params[PARAM_GRAPH_MODELS])
        bundle = load_bundle(version_dir(args) / BUNDLE_DIR)
        outputs = graph_output_names(bundle.manifest_data)

        def session(name: str) -> TritonGraphSession:
            entry = bundle.manifest_data.model(name)
            tensors = {**(entry.inputs or {}), **(entry.outputs or {})}
            ranks = {n: len(t.shape or ()) for n, t in tensors.items()}
            return TritonGraphSession(self.pb, graph_models[name], outputs[name], ranks)

        self.pipeline = OrtPipeline(
            bundle, _session_options(params, args, bank_search="numpy"), session_factory=session
        )
        self.bundle_hash = self.pipeline.bundle_hash


def graph_output_names(manifest: BundleManifest) -> dict[str, list[str]]:
    """Each graph's outputs in the order its onnxruntime session returns them.

    The manifest's ``outputs`` are keyed by name (JSON objects have no order to rely on); the
    image encoder's order is the one ``encoder.output_names`` records.
    """
    out = {name: list(entry.outputs or {}) for name, entry in (manifest.models or {}).items()}
    if "image_encoder" in out and manifest.encoder is not None and manifest.encoder.output_names is not None:
        out["image_encoder"] = list(manifest.encoder.output_names)
    return out


class GraphModel:
    """One ONNX graph on ONNX Runtime, as a Python-backend model (no onnxruntime backend needed)."""

    pb: Any = None

    def initialize(self, args: dict[str, Any]) -> None:
        from o2n_edge.runtime.pipeline import _make_session

        params = model_parameters(args)
        path = version_dir(args) / params[PARAM_GRAPH_FILE]
        self.session = _make_session(path, _session_options(params, args))
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.ranks = {i.name: len(i.shape) for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def execute(self, requests: Sequence[Any]) -> list[Any]:
        """Requests Triton batched together run as one concatenated batch."""
        pb = self.pb
        feeds_per = [
            {n: self._shaped(n, pb.get_input_tensor_by_name(r, n).as_numpy()) for n in self.inputs}
            for r in requests
        ]
        sizes = [len(f[self.inputs[0]]) for f in feeds_per]
        try:
            feeds = {n: np.concatenate([f[n] for f in feeds_per]) for n in self.inputs}
            outs = self.session.run(None, feeds)
        except Exception as exc:  # noqa: BLE001 - answer every request with the failure
            error = pb.TritonError(f"{type(exc).__name__}: {exc}")
            return [pb.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses, start = [], 0
        for n in sizes:
            tensors = [pb.Tensor(name, o[start:start + n]) for name, o in zip(self.outputs, outs)]
            responses.append(pb.InferenceResponse(output_tensors=tensors))
            start += n
        return responses

    def _shaped(self, name: str, arr: np.ndarray) -> np.ndarray:
        """A per-sample scalar may arrive as (B, 1) (the config's dims [1]): the graph wants (B,)."""
        if self.ranks.get(name) == 1 and arr.ndim == 2:
            return arr.reshape(-1)
        return arr

    def finalize(self) -> None:
        self.session = None
