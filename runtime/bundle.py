"""The bundle: the one directory the offline stage writes and the line-side runtime reads.

Why a strict format: the runtime runs on a device far from the workstation that produced the
models, so everything a score depends on (graphs, prompt embeddings, memory bank, scheduler
tables, fusion and normalization constants, threshold) travels in one directory whose every
file is hashed. A bundle that does not match its manifest (a truncated copy, a hand-edited
array, a stray file, an older schema) is refused instead of producing silently wrong scores.

This module is numpy-only (json/hashlib/pathlib + numpy); it never imports torch.

Layout::

    <bundle>/
      manifest.json          (written last by ``o2n_edge.runtime.bundle_writer.BundleWriter``)
      unet.onnx [+ unet.onnx.data]  vae_encoder.onnx  vae_decoder.onnx  image_encoder.onnx
      prompt_embeds.npy  memory_bank.npy  [text_features.npy]
      engines/               optional, built on the target device; NOT listed in ``files``
                             (each plan has its own sidecar key, see ``engine_cache``)

The manifest's keys and types are declared once, in :mod:`o2n_edge.runtime.manifest`
(:class:`~o2n_edge.runtime.manifest.BundleManifest` and one dataclass per section); this module
verifies a bundle against it and opens it. ``files`` lists every file except ``manifest.json``
and ``engines/`` with its sha256 and size; ``manifest_sha256`` hashes every other key
(:func:`manifest_digest`), so a hand-edited threshold or weight is refused like a changed file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from o2n_edge.runtime.manifest import (  # noqa: F401 - re-exported: the bundle's public names
    DIGEST_KEY,
    ENGINES_DIR,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    BundleError,
    BundleManifest,
    ModelEntry,
    check_file_name,
    manifest_digest,
    read_manifest_json,
)

HASH_CHUNK = 1 << 20  # 1 MiB reads keep memory flat on multi-GB graphs
REQUIRED_KEYS = ("schema_version", "files", DIGEST_KEY)
# onnxruntime's CPU NchwcTransformer (graph optimization level ALL) segfaults at session creation
# on fp16 graphs containing Transpose -> MatMul (seen with onnxruntime 1.32, e.g. every attention
# block); a segfault cannot be caught, so fp16 graphs are always opened with it disabled. It only
# speeds up fp32 convolutions on CPU, and fp16 graphs are meant for GPUs anyway.
ORT_DISABLED_OPTIMIZERS: dict[str, tuple[str, ...]] = {"fp32": (), "fp16": ("NchwcTransformer",)}


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks (graphs can be several GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


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


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The raw dict of ``<bundle>/manifest.json``; raise :class:`BundleError` when missing or malformed.

    Callers that want the keys typed use :func:`o2n_edge.runtime.manifest.load_manifest`.
    """
    return read_manifest_json(path)


def verify_bundle(path: str | Path) -> list[str]:
    """Every problem that makes ``path`` an untrustworthy bundle (empty list = good).

    Checks: directory and manifest exist, the manifest passes the schema
    (:meth:`BundleManifest.check`: types, required keys, schema version, file names, model
    files), its digest matches, every listed file exists with the listed size and sha256, and
    no unlisted file sits in the bundle (except under ``engines/``). Each problem names the
    file or key it is about, so an operator knows what to re-copy.
    """
    root = Path(path)
    if not root.is_dir():
        return [f"{root}: not a directory"]
    try:
        raw = read_manifest_json(root)
    except BundleError as exc:
        return [str(exc)]
    manifest, problems = BundleManifest.check(raw)
    if DIGEST_KEY in raw and raw[DIGEST_KEY] != manifest_digest(raw):
        problems.append(f"{MANIFEST_NAME}: content does not match its {DIGEST_KEY} (edited by hand?)")
    for name, entry in manifest.files.items():
        fpath = root / name
        if not fpath.is_file():
            problems.append(f"{name}: missing file")
            continue
        size = fpath.stat().st_size
        if size != entry.bytes:
            problems.append(f"{name}: size {size} != {entry.bytes} in manifest")
            continue
        if sha256_file(fpath) != entry.sha256:
            problems.append(f"{name}: sha256 mismatch (corrupted or modified)")
    listed = raw.get("files") if isinstance(raw.get("files"), dict) else {}
    for name in list_bundle_files(root):
        if name not in listed:
            problems.append(f"{name}: extra file not listed in {MANIFEST_NAME}")
    return problems


@dataclass
class Bundle:
    """A verified bundle: the typed manifest, file paths, and arrays loaded on first use."""

    path: Path
    manifest_data: BundleManifest
    _arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _manifest_dict: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest as the plain dict on disk (for callers not yet on :attr:`manifest_data`)."""
        if self._manifest_dict is None:
            self._manifest_dict = self.manifest_data.to_dict()
        return self._manifest_dict

    @property
    def files(self) -> dict[str, Path]:
        """Listed file name -> absolute path."""
        return {name: self.path / name for name in self.manifest_data.files}

    @property
    def models(self) -> dict[str, dict[str, Any]]:
        """The ``models`` section as plain dicts (may be empty for scoring-only bundles)."""
        return {name: entry.to_dict() for name, entry in (self.manifest_data.models or {}).items()}

    @property
    def engines_dir(self) -> Path:
        """Where target-built TensorRT plans live (may not exist)."""
        return self.path / ENGINES_DIR

    def file(self, name: str) -> Path:
        """Path of a listed file; KeyError-free message when absent."""
        if name not in self.manifest_data.files:
            raise BundleError(f"{self.path}: no file {name!r} in the bundle")
        return self.path / name

    def model_entry(self, name: str) -> ModelEntry:
        """The typed ``models[name]`` entry (empty when the manifest does not describe ``name``)."""
        return self.manifest_data.model(name)

    def model_path(self, name: str) -> Path:
        """The ONNX file of model ``name`` (``models[name].file`` or ``<name>.onnx``)."""
        return self.file(self.model_entry(name).file or f"{name}.onnx")

    def ort_disabled_optimizers(self, name: str) -> list[str]:
        """``disabled_optimizers=`` for an onnxruntime session on model ``name`` (see the constant)."""
        entry = self.model_entry(name)
        if entry.ort_disabled_optimizers is not None:
            return list(entry.ort_disabled_optimizers)
        return list(ORT_DISABLED_OPTIMIZERS.get(entry.precision or "fp32", ()))

    def has_array(self, name: str) -> bool:
        """Whether ``<name>.npy`` is in the bundle (e.g. the optional text features)."""
        return f"{name}.npy" in self.manifest_data.files

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
    return Bundle(path=root, manifest_data=BundleManifest.from_dict(read_manifest_json(root)))
