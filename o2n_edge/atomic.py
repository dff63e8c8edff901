"""Write a file or a whole directory so that it appears complete or not at all.

Why: every long step (export, evaluation, a report, a checkpoint) can be killed midway, and the
next run or a reader on the line must never find half a file under the final name. Everything
here writes beside the target (same directory, hence the same file system, so the final
``os.replace`` is a single atomic rename) and removes its temporary on any error, leaving what
was there before untouched.

- :func:`atomic_write_bytes`, :func:`atomic_write_text`, :func:`atomic_write_json`: a whole file.
- :func:`atomic_open`: an open text/binary handle, for writers that stream (csv, json.dump).
- :func:`atomic_path`: a temp path, for libraries that want a file name (``np.save``).
- :class:`AtomicDir`: a directory staged beside the target and renamed in; an existing one is
  moved aside first and put back if the rename fails.

Standard library only: the torch-free runtime uses it too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any

TMP_PREFIX = ".tmp-"  # staged directory: .<name>.tmp-<id>
OLD_PREFIX = ".old-"  # replaced directory, deleted after the swap: .<name>.old-<id>


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path`` (same suffix); renamed onto ``path`` when the block succeeds.

    The suffix is kept so libraries that append one (``np.save`` adds ``.npy``) write exactly
    the yielded name.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", *, encoding: str | None = "utf-8",
                newline: str | None = None, fsync: bool = True) -> Iterator[IO[Any]]:
    """Open a temp file beside ``path`` for writing; it replaces ``path`` when the block succeeds.

    ``fsync`` flushes the data to disk before the rename, so a power cut after the rename
    cannot leave an empty file under the final name.
    """
    if "w" not in mode or "+" in mode:
        raise ValueError(f"atomic_open writes a new file: mode must be 'w' or 'wb', got {mode!r}")
    binary = "b" in mode
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if binary else encoding, newline=None if binary else newline) as fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` whole or not at all; returns ``path``."""
    with atomic_open(path, "wb", fsync=fsync) as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, *, encoding: str = "utf-8", fsync: bool = True) -> Path:
    """Write ``text`` to ``path`` whole or not at all; returns ``path``."""
    with atomic_open(path, "w", encoding=encoding, fsync=fsync) as fh:
        fh.write(text)
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 2, sort_keys: bool = False,
                      default: Callable[[Any], Any] | None = None, allow_nan: bool = True,
                      fsync: bool = True) -> Path:
    """Write ``obj`` as JSON (with a trailing newline) whole or not at all; returns ``path``.

    The text is built before the temp file is opened, so an unserializable value fails without
    touching the disk.
    """
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default, allow_nan=allow_nan) + "\n"
    return atomic_write_text(path, text, fsync=fsync)


class AtomicDir:
    """Stage a directory in ``<parent>/.<name>.tmp-<id>`` and rename it onto ``<parent>/<name>``.

    Use as ``with AtomicDir(out) as tmp: ...`` (committed when the block succeeds, discarded on
    an exception), or call :meth:`open`, :meth:`commit` and :meth:`discard` yourself when the
    decision to commit is made elsewhere (``BundleWriter``). ``replace=False`` refuses an
    existing target, both before staging and at the rename (it may appear meanwhile).
    """

    def __init__(self, path: str | Path, *, replace: bool = True) -> None:
        self.path = Path(path).resolve()
        self.replace = replace
        self.tmp: Path | None = None

    def open(self) -> Path:
        """Create the staging directory (and the target's parent); returns it."""
        if self.tmp is not None:
            raise RuntimeError(f"{self.path}: already staging in {self.tmp}")
        if self.path.exists() and not self.replace:
            raise FileExistsError(f"{self.path} exists; not replacing it")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.parent / f".{self.path.name}{TMP_PREFIX}{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        return self.tmp

    def commit(self) -> Path:
        """Swap the staged directory in; an existing target is moved aside, then deleted."""
        if self.tmp is None:
            raise RuntimeError("nothing staged: call open() first")
        trash = None
        if self.path.exists():
            if not self.replace:
                raise FileExistsError(f"{self.path} appeared while it was being written; not replacing it")
            trash = self.path.parent / f".{self.path.name}{OLD_PREFIX}{uuid.uuid4().hex[:8]}"
            os.replace(self.path, trash)
        try:
            os.replace(self.tmp, self.path)
        except BaseException:
            if trash is not None:  # put the old one back
                os.replace(trash, self.path)
            raise
        self.tmp = None
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return self.path

    def discard(self) -> None:
        """Remove the staging directory if it is still there (no-op after :meth:`commit`)."""
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def __enter__(self) -> Path:
        return self.open()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if exc_type is None:
                self.commit()
        finally:
            self.discard()
