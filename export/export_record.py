"""What one ONNX export produced, and how a later export knows it is still current.

Why apart from :mod:`o2n_edge.export.onnx_export`: the export runs torch and onnx; this module is
the bookkeeping around it. The :class:`ExportReport` is the sidecar ``<out>.onnx.json`` and the
bundle manifest's model entry; :func:`input_hash` covers everything that changes the artifact
(weights, configs, wrapper source, spec, precision, options, producing versions), so an export
with the same hash and an intact output is skipped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from o2n_edge._lazy import require
from o2n_edge.runtime.bundle import ORT_DISABLED_OPTIMIZERS

from o2n_edge.runtime.bundle_writer import producing_versions
from .specs import ExportSpec, spec_digest
from .validate import real_cases

torch = require("torch", "the ONNX export")

SIDECAR_SUFFIX = ".json"
HASH_VERSIONS = ("o2n-edge", "torch", "diffusers", "onnx", "onnxruntime", "onnxslim")
REPORT_VERSION = 1


@dataclass
class ExportReport:
    """What one export produced (also the sidecar content and the manifest's model entry)."""

    name: str
    path: str
    precision: str
    input_hash: str
    sha256: str  # model_digest: .onnx (+ .onnx.data)
    files: list[str]  # file names written next to each other (graph first)
    bytes: int
    opset: int
    skipped: bool = False
    external_data: bool = False
    simplified: bool = False
    simplify_error: str | None = None
    fp16: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, float] = field(default_factory=dict)
    tolerance: float = 0.0
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    trt_profiles: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    export_s: float = 0.0
    versions: dict[str, Any] = field(default_factory=dict)
    report_version: int = REPORT_VERSION

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (the sidecar)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExportReport:
        """Inverse of :meth:`to_dict`; unknown keys are ignored."""
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def manifest_entry(self) -> dict[str, Any]:
        """The bundle manifest's ``models[name]`` entry (file name relative to the bundle)."""
        return {
            "file": Path(self.path).name,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "precision": self.precision,
            "opset": self.opset,
            "validation": self.validation,
            "tolerance": self.tolerance,
            "trt_profiles": self.trt_profiles,
            "ort_disabled_optimizers": list(ORT_DISABLED_OPTIMIZERS.get(self.precision, ())),
            "extra": self.extra,
        }


def state_digest(module: Any) -> str:
    """sha256 over every parameter/buffer (name, dtype, shape, bytes), streamed."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def _inputs_digest(real_inputs: Any) -> str | None:
    """sha256 over the real inputs' arrays (None when there are none)."""
    if real_inputs is None:
        return None
    h = hashlib.sha256()
    for _, xs in enumerate(real_cases(real_inputs)):
        for x in xs:
            a = np.ascontiguousarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x))
            h.update(f"{a.dtype}|{a.shape}|".encode())
            h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _configs(module: Any) -> dict[str, Any]:
    """diffusers/transformers configs of every submodule (e.g. the VAE's scaling_factor)."""
    out = {}
    for name, sub in module.named_modules():
        cfg = getattr(sub, "config", None)
        if cfg is None:
            continue
        try:
            d = dict(cfg) if hasattr(cfg, "keys") else cfg.to_dict()
        except Exception:  # noqa: BLE001 - unknown config types are described by repr
            d = {"repr": repr(cfg)}
        out[name] = json.loads(json.dumps(d, sort_keys=True, default=str))
    return out


def input_hash(module: Any, spec: ExportSpec, precision: str, options: dict[str, Any]) -> str:
    """The export's input hash: anything that changes here changes the artifact."""
    versions = producing_versions(HASH_VERSIONS)
    blob = json.dumps(
        {
            "state": state_digest(module),
            "module": repr(module),
            "configs": _configs(module),
            "spec": spec_digest(spec),
            "precision": precision,
            "options": options,
            "versions": versions,
        },
        sort_keys=True, default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def sidecar_path(out_path: str | Path) -> Path:
    """``<out>.onnx.json``."""
    p = Path(out_path)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def _read_sidecar(out_path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(sidecar_path(out_path).read_text())
    except (OSError, ValueError):
        return None
