"""Write a bundle atomically: everything lands in a temp dir beside the target, renamed on success.

Why: an export that dies halfway (out of memory, Ctrl-C, a failed validation) must not leave a
directory that looks like a bundle; and re-running must be able to replace an old bundle only
when asked (``force``). The manifest is written last and hashes every file, so the runtime's
``verify_bundle`` (``o2n_edge.runtime.bundle``) can refuse anything that changed afterwards.
The manifest keys are declared in ``o2n_edge.runtime.manifest``.

Usage::

    with BundleWriter(out_dir, force=True) as w:
        w.add_file("unet.onnx", exported_path)
        w.add_array("memory_bank", bank)
        w.write_manifest({"profile": "tiny", ...})
    # out_dir now exists, complete; on an exception nothing was created or replaced.

Torch-free (importlib.metadata for versions), so it also runs where only the runtime is
installed.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from o2n_edge.atomic import AtomicDir
from o2n_edge.runtime.bundle import list_bundle_files, sha256_file
from o2n_edge.runtime.manifest import (
    DIGEST_KEY,
    ENGINES_DIR,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    BundleManifest,
    check_file_name,
    manifest_digest,
    manifest_json,
)

log = logging.getLogger(__name__)

VERSION_PACKAGES = ("o2n-edge", "torch", "diffusers", "onnx", "onnxruntime", "onnxslim",
                    "open_clip_torch", "numpy")


def producing_versions(packages: tuple[str, ...] = VERSION_PACKAGES) -> dict[str, str | None]:
    """Installed versions of the producing packages (None when absent), without importing them."""
    out: dict[str, str | None] = {}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    if out.get("o2n-edge") is None:  # running from a source tree without an install
        try:
            from o2n_edge import __version__

            out["o2n-edge"] = __version__
        except ImportError:
            pass
    return out


def json_default(obj: Any) -> Any:
    """numpy scalars/arrays and paths in manifests become plain JSON (``json.dumps(default=...)``)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return obj.as_posix()
    raise TypeError(f"not JSON-serializable in a manifest: {type(obj).__name__}")


class BundleWriter:
    """Context manager that stages a bundle in ``<parent>/.<name>.tmp-<id>`` and renames it in."""

    def __init__(self, out_dir: str | Path, force: bool = False) -> None:
        self.out_dir = Path(out_dir).resolve()
        self.force = force
        self.tmp_dir: Path | None = None
        self.manifest: dict[str, Any] | None = None
        self.manifest_data: BundleManifest | None = None  # typed view of ``manifest``
        self._staging = AtomicDir(self.out_dir, replace=force)

    # context ------------------------------------------------------------------------------
    def __enter__(self) -> BundleWriter:
        if self.out_dir.exists() and not self.force:
            raise FileExistsError(f"{self.out_dir} exists; pass force=True (--force) to replace it")
        self.tmp_dir = self._staging.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                if self.manifest is None:
                    raise RuntimeError("BundleWriter closed without write_manifest(): nothing written")
                self._staging.commit()  # an existing bundle is swapped out only now, and put back on failure
                log.info("bundle written: %s", self.out_dir)
        finally:
            self._staging.discard()

    # content ------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        """Staging path for ``name`` (write there directly, e.g. an exporter's output)."""
        if self.tmp_dir is None:
            raise RuntimeError("use BundleWriter as a context manager")
        if self.manifest is not None:
            raise RuntimeError("manifest already written: the bundle is sealed")
        bad = check_file_name(name)
        if bad:
            raise ValueError(bad)
        target = self.tmp_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def add_file(self, name: str, src_path: str | Path, move: bool = False) -> Path:
        """Copy (or move) ``src_path`` into the bundle as ``name``; returns the staged path.

        An ONNX graph with external data (``<src>.data``) brings its data file along under
        ``<name>.data``, which is the location the graph refers to when the names match.
        """
        src = Path(src_path)
        if not src.is_file():
            raise FileNotFoundError(f"bundle file source not found: {src}")
        target = self.path(name)
        (shutil.move if move else shutil.copy2)(str(src), str(target))
        data = src.with_name(src.name + ".data")
        if name.endswith(".onnx") and data.is_file():
            if src.name != Path(name).name:
                raise ValueError(
                    f"{src} has external data {data.name}: add it under its own name "
                    f"({src.name}), the graph refers to its data file by name"
                )
            staged = self.path(name + ".data")
            (shutil.move if move else shutil.copy2)(str(data), str(staged))
            # onnx writes external data owner-only (0600, seen on the real-size UNet): a bundle is read
            # by the serving user or a container, so it gets the graph's own permissions
            staged.chmod(target.stat().st_mode & 0o777)
        return target

    def add_array(self, name: str, array: np.ndarray) -> Path:
        """Save ``array`` as ``<name>.npy`` (object arrays refused: the runtime loads no pickles)."""
        arr = np.asarray(array)
        if arr.dtype == object:
            raise TypeError(f"{name}: object arrays cannot go in a bundle (no pickles)")
        fname = name if name.endswith(".npy") else f"{name}.npy"
        target = self.path(fname)
        np.save(target, arr, allow_pickle=False)
        return target

    def add_json(self, name: str, obj: Mapping[str, Any]) -> Path:
        """Write an auxiliary JSON file (hashed like every other file)."""
        target = self.path(name)  # inside the staged dir: the rename of the whole bundle is the atomic step
        target.write_text(json.dumps(obj, indent=2, sort_keys=True, default=json_default))
        return target

    def write_manifest(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Hash every staged file and write ``manifest.json`` (seals the bundle).

        Adds ``schema_version``, ``files`` ({name: {sha256, bytes}}), ``versions`` and
        ``manifest_sha256``; keys given in ``manifest`` for those are overwritten, except extra
        ``versions`` entries. Values must be JSON-able (numpy scalars/arrays are converted;
        NaN/Inf are refused), and the result must pass the schema
        (:meth:`o2n_edge.runtime.manifest.BundleManifest.from_dict`): a mistyped key, or a model
        entry naming a file not in the bundle, raises :class:`BundleError` (a ``ValueError``).
        """
        if self.tmp_dir is None:
            raise RuntimeError("use BundleWriter as a context manager")
        if self.manifest is not None:
            raise RuntimeError("manifest already written")
        engines = self.tmp_dir / ENGINES_DIR
        if engines.exists():
            raise ValueError(f"{ENGINES_DIR}/ is built on the target device, not exported")
        files = {
            name: {"sha256": sha256_file(self.tmp_dir / name),
                   "bytes": (self.tmp_dir / name).stat().st_size}
            for name in list_bundle_files(self.tmp_dir)
        }
        out = dict(manifest)
        out["schema_version"] = SCHEMA_VERSION
        out["files"] = files
        out["versions"] = {**dict(out.get("versions", {})), **producing_versions()}
        # Round-trip through JSON first so the digest is computed on exactly what is read back.
        out = json.loads(json.dumps(out, default=json_default, allow_nan=False))
        out[DIGEST_KEY] = manifest_digest(out)
        typed = BundleManifest.from_dict(out)  # BundleError naming the key: nothing is written
        (self.tmp_dir / MANIFEST_NAME).write_text(manifest_json(typed), encoding="utf-8")
        self.manifest_data = typed
        self.manifest = out
        return out
