"""The bundle: the one directory the offline stage writes and the line-side runtime reads.

Why a strict format: the runtime runs on a device far from the workstation that produced the
models, so everything a score depends on (graphs, prompt embeddings, memory bank, scheduler
tables, fusion and normalization constants, threshold) travels in one directory whose every
file is hashed. A bundle that does not match its manifest (a truncated copy, a hand-edited
array, a stray file, an older schema) is refused instead of producing silently wrong scores.

This module is numpy-only (json/hashlib/pathlib + numpy); it never imports torch.

Layout::

    <bundle>/
      manifest.json          (written last by ``o2n_edge.export.bundle_writer.BundleWriter``)
      unet.onnx [+ unet.onnx.data]  vae_encoder.onnx  vae_decoder.onnx  image_encoder.onnx
      prompt_embeds.npy  memory_bank.npy  [text_features.npy]
      engines/               optional, built on the target device; NOT listed in ``files``
                             (each plan has its own sidecar key, see ``engine_cache``)

Manifest keys (``schema_version`` == :data:`SCHEMA_VERSION`):

- ``schema_version`` (int): format version; a different value is refused.
- ``profile`` (str): ``tiny`` | ``lite`` | ``sd15``.
- ``category`` (str): product category the bundle was personalized on.
- ``image_size`` (int): side of the scoring encoder's square input.
- ``diffusion_image_size`` (int): pixel side the diffusion model (VAE/UNet) works at.
- ``shots`` (dict): ``{"images": [names of the k good images], "seed": int}``.
- ``prompt`` (str): the personalized prompt (its hidden states are ``prompt_embeds.npy``).
- ``strength`` (float), ``steps`` (int): img2img strength and scheduler steps requested;
  ``steps_run`` (int): steps actually run (``int(steps * strength)`` style truncation).
- ``scheduler`` (dict): the LCM scheduler tables (``o2n_edge.export.scheduler_tables.lcm_tables``).
- ``fusion`` (dict): branch weights and every normalization constant the scoring needs.
- ``threshold`` (dict): ``{"value": float, "method": str, "quantile": float}``.
- ``files`` (dict): ``{name: {"sha256": hex, "bytes": int}}`` for every file except
  ``manifest.json`` and ``engines/``; names are POSIX paths relative to the bundle.
- ``models`` (dict): ``{name: {"file", "inputs", "outputs", "precision", "opset",
  "validation", "tolerance", "trt_profiles", "ort_disabled_optimizers", "extra"}}``
  (``ExportReport.manifest_entry()``);
  ``inputs``/``outputs`` map tensor names to ``{"shape": [int | symbol], "dtype": str}``.
- ``versions`` (dict): producing versions (o2n_edge, torch, diffusers, onnx, onnxruntime, ...).
- ``manifest_sha256`` (str): sha256 of the canonical JSON of every other key
  (:func:`manifest_digest`), so a hand-edited threshold or weight is refused like a changed file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
ENGINES_DIR = "engines"  # built on the target; excluded from the file list
HASH_CHUNK = 1 << 20  # 1 MiB reads keep memory flat on multi-GB graphs
DIGEST_KEY = "manifest_sha256"
REQUIRED_KEYS = ("schema_version", "files", DIGEST_KEY)
# onnxruntime's CPU NchwcTransformer (graph optimization level ALL) segfaults at session creation
# on fp16 graphs containing Transpose -> MatMul (seen with onnxruntime 1.32, e.g. every attention
# block); a segfault cannot be caught, so fp16 graphs are always opened with it disabled. It only
# speeds up fp32 convolutions on CPU, and fp16 graphs are meant for GPUs anyway.
ORT_DISABLED_OPTIMIZERS: dict[str, tuple[str, ...]] = {"fp32": (), "fp16": ("NchwcTransformer",)}


class BundleError(ValueError):
    """A bundle is missing, malformed or does not match its manifest; the message lists why."""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks (graphs can be several GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_file_name(name: str) -> str | None:
    """Return why ``name`` is not a valid bundle file name, or None.

    Names are relative POSIX paths that stay inside the bundle: a manifest must never make the
    runtime read (or the writer overwrite) a file elsewhere on the device.
    """
    if not isinstance(name, str) or not name:
        return f"invalid file name {name!r}"
    p = PurePosixPath(name)
    if p.is_absolute() or "\\" in name or any(part in ("", ".", "..") for part in name.split("/")):
        return f"invalid file name {name!r} (must be a relative path inside the bundle)"
    if name == MANIFEST_NAME:
        return f"{MANIFEST_NAME!r} cannot be listed as a bundle file"
    if p.parts[0] == ENGINES_DIR:
        return f"{name!r}: files under {ENGINES_DIR}/ are built on the target, not listed"
    return None


def list_bundle_files(root: str | Path) -> list[str]:
    """Every file under ``root`` (POSIX names), except the manifest and ``engines/``."""
    root = Path(root)
    names = []
    for p in sorted(root.rglob("*")):
        if p.is_dir() and not p.is_symlink():
            continue
        rel = p.relative_to(root).as_posix()
        if rel == MANIFEST_NAME or rel.split("/")[0] == ENGINES_DIR:
            continue
        names.append(rel)
    return names


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own ``manifest_sha256`` key."""
    body = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Parse ``<bundle>/manifest.json``; raise :class:`BundleError` when missing or malformed."""
    mpath = Path(path) / MANIFEST_NAME
    if not mpath.is_file():
        raise BundleError(f"{path}: missing {MANIFEST_NAME}")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: malformed {MANIFEST_NAME}: {exc}") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: malformed {MANIFEST_NAME}: top level is not an object")
    return manifest


def verify_bundle(path: str | Path) -> list[str]:
    """Every problem that makes ``path`` an untrustworthy bundle (empty list = good).

    Checks: directory and manifest exist, manifest is valid JSON with the current schema
    version, every listed file exists with the listed size and sha256, no unlisted file sits
    in the bundle (except under ``engines/``), and every model entry points at a listed file.
    Each problem names the file it is about, so an operator knows what to re-copy.
    """
    root = Path(path)
    if not root.is_dir():
        return [f"{root}: not a directory"]
    try:
        manifest = read_manifest(root)
    except BundleError as exc:
        return [str(exc)]
    problems: list[str] = []
    for key in REQUIRED_KEYS:
        if key not in manifest:
            problems.append(f"{MANIFEST_NAME}: missing key {key!r}")
    version = manifest.get("schema_version")
    if "schema_version" in manifest and version != SCHEMA_VERSION:
        problems.append(
            f"{MANIFEST_NAME}: schema_version {version!r} is not {SCHEMA_VERSION} "
            "(re-export the bundle with this o2n-edge version)"
        )
    if DIGEST_KEY in manifest and manifest[DIGEST_KEY] != manifest_digest(manifest):
        problems.append(f"{MANIFEST_NAME}: content does not match its {DIGEST_KEY} (edited by hand?)")
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        problems.append(f"{MANIFEST_NAME}: 'files' is not an object")
        files = {}
    for name, entry in files.items():
        bad = check_file_name(name)
        if bad:
            problems.append(f"{MANIFEST_NAME}: {bad}")
            continue
        if not isinstance(entry, dict) or "sha256" not in entry or "bytes" not in entry:
            problems.append(f"{name}: malformed entry in {MANIFEST_NAME}")
            continue
        fpath = root / name
        if not fpath.is_file():
            problems.append(f"{name}: missing file")
            continue
        size = fpath.stat().st_size
        if size != entry["bytes"]:
            problems.append(f"{name}: size {size} != {entry['bytes']} in manifest")
            continue
        if sha256_file(fpath) != entry["sha256"]:
            problems.append(f"{name}: sha256 mismatch (corrupted or modified)")
    for name in list_bundle_files(root):
        if name not in files:
            problems.append(f"{name}: extra file not listed in {MANIFEST_NAME}")
    models = manifest.get("models", {})
    if isinstance(models, dict):
        for mname, entry in models.items():
            fname = entry.get("file") if isinstance(entry, dict) else None
            if fname is not None and fname not in files:
                problems.append(f"models.{mname}: file {fname!r} not listed in {MANIFEST_NAME}")
    else:
        problems.append(f"{MANIFEST_NAME}: 'models' is not an object")
    return problems


@dataclass
class Bundle:
    """A verified bundle: the manifest, file paths, and arrays loaded on first use."""

    path: Path
    manifest: dict[str, Any]
    _arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def files(self) -> dict[str, Path]:
        """Listed file name -> absolute path."""
        return {name: self.path / name for name in self.manifest["files"]}

    @property
    def models(self) -> dict[str, dict[str, Any]]:
        """The ``models`` section (may be empty for scoring-only bundles)."""
        return self.manifest.get("models", {})

    @property
    def engines_dir(self) -> Path:
        """Where target-built TensorRT plans live (may not exist)."""
        return self.path / ENGINES_DIR

    def file(self, name: str) -> Path:
        """Path of a listed file; KeyError-free message when absent."""
        if name not in self.manifest["files"]:
            raise BundleError(f"{self.path}: no file {name!r} in the bundle")
        return self.path / name

    def model_path(self, name: str) -> Path:
        """The ONNX file of model ``name`` (``models[name]["file"]`` or ``<name>.onnx``)."""
        entry = self.models.get(name, {})
        return self.file(entry.get("file", f"{name}.onnx"))

    def ort_disabled_optimizers(self, name: str) -> list[str]:
        """``disabled_optimizers=`` for an onnxruntime session on model ``name`` (see the constant)."""
        entry = self.models.get(name, {})
        if "ort_disabled_optimizers" in entry:
            return list(entry["ort_disabled_optimizers"])
        return list(ORT_DISABLED_OPTIMIZERS.get(entry.get("precision", "fp32"), ()))

    def has_array(self, name: str) -> bool:
        """Whether ``<name>.npy`` is in the bundle (e.g. the optional text features)."""
        return f"{name}.npy" in self.manifest["files"]

    def array(self, name: str) -> np.ndarray:
        """Load ``<name>.npy`` once (no pickles: a bundle must not be able to run code)."""
        if name not in self._arrays:
            self._arrays[name] = np.load(self.file(f"{name}.npy"), allow_pickle=False)
        return self._arrays[name]


def load_bundle(path: str | Path) -> Bundle:
    """Open a bundle after :func:`verify_bundle`; raise :class:`BundleError` listing every problem."""
    root = Path(path).resolve()
    problems = verify_bundle(root)
    if problems:
        raise BundleError(f"refusing bundle {root}:\n  " + "\n  ".join(problems))
    return Bundle(path=root, manifest=read_manifest(root))
