"""Keep what was inspected: each image's original bytes, named by their sha256, with retention.

Why keep the original request bytes (not the decoded pixels): they are what the results log's
``image_sha256`` names, so a kept file can be checked against its log row at any time, and the
learning step decodes them exactly as the server did. Why a bounded store: a line-side box runs
for months; the store drops the oldest files past ``max_files``/``max_bytes`` and stops keeping
altogether while the file system is nearly full, so keeping images can never take the disk (and
with it the results log) down. A file that cannot be written is a log line and a metric, never a
failed inspection: the line needs the verdict more than the copy.

Layout: ``<dir>/<sha256>.<ext>`` with ``ext`` from the bytes' format (``jpg``, ``png``, ...),
each written atomically (temp file + rename), so a reader never sees half an image.

Runtime rule: standard library only; nothing here may import torch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable

from o2n_edge.atomic import atomic_write_bytes

logger = logging.getLogger("o2n_edge.image_store")

# Defaults of `serve --keep-max-files/--keep-max-bytes`: a few days of a slow line, ~2 GiB.
KEEP_MAX_FILES = 20_000
KEEP_MAX_BYTES = 2 * 1024**3
# Stop keeping while the file system has less than this fraction free, or less than the floor.
MIN_FREE_FRACTION = 0.05
MIN_FREE_BYTES = 256 * 1024**2
# Leading bytes -> extension, for the formats the decoder accepts.
SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tif"),
    (b"MM\x00*", "tif"),
    (b"P6", "ppm"),
    (b"P5", "pgm"),
)
EXTENSIONS = frozenset(ext for _, ext in SIGNATURES) | {"webp", "bin"}


def image_extension(data: bytes) -> str:
    """The file extension of encoded image bytes (``bin`` when the format is not recognised)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for magic, ext in SIGNATURES:
        if data.startswith(magic):
            return ext
    return "bin"


def kept_path(directory: str | Path, image_sha256: str) -> Path | None:
    """The kept file of ``image_sha256`` in ``directory`` (any extension), or None.

    What a reader of the store (the learning step) uses; the name alone is not proof of the
    content, so readers check the sha (:func:`verify_kept`).
    """
    for path in Path(directory).glob(f"{image_sha256}.*"):
        if path.suffix[1:] in EXTENSIONS and path.is_file():
            return path
    return None


def verify_kept(path: Path, image_sha256: str) -> bool:
    """True when the file's bytes still hash to ``image_sha256``."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() == image_sha256
    except OSError:
        return False


class ImageStore:
    """A bounded, thread-safe directory of kept images (see the module docstring).

    ``on_failure`` is called once per image that could not be kept (the server counts them as
    ``o2n_keep_failures_total``). Files already in the directory at start count toward the
    limits, oldest (by modification time) first.
    """

    def __init__(
        self,
        directory: str | Path,
        max_files: int = KEEP_MAX_FILES,
        max_bytes: int = KEEP_MAX_BYTES,
        min_free_fraction: float = MIN_FREE_FRACTION,
        min_free_bytes: int = MIN_FREE_BYTES,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        if max_files < 1 or max_bytes < 1:
            raise ValueError("keep limits must be positive (max files and max bytes)")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_files = int(max_files)
        self.max_bytes = int(max_bytes)
        self.min_free_fraction = float(min_free_fraction)
        self.min_free_bytes = int(min_free_bytes)
        self.on_failure = on_failure
        self._lock = threading.Lock()
        self._index: OrderedDict[str, tuple[Path, int]] = OrderedDict()  # oldest first
        self._bytes = 0
        self._scan()

    @property
    def count(self) -> int:
        """Files kept now."""
        return len(self._index)

    @property
    def total_bytes(self) -> int:
        """Bytes kept now."""
        return self._bytes

    def keep(self, data: bytes, image_sha256: str | None = None) -> Path | None:
        """Store ``data`` as ``<sha256>.<ext>``; the path, or None when it could not be kept.

        Never raises for a disk problem: the inspection it belongs to must still be answered.
        An image seen before is not written again, only moved to the young end of retention.
        """
        sha = image_sha256 or hashlib.sha256(data).hexdigest()
        path = self.directory / f"{sha}.{image_extension(data)}"
        with self._lock:
            try:
                if sha in self._index and self._index[sha][0].is_file():
                    os.utime(self._index[sha][0])
                    self._index.move_to_end(sha)
                    return self._index[sha][0]
                reason = self._no_room(len(data))
                if reason:
                    return self._failed(sha, reason)
                atomic_write_bytes(path, data)
            except OSError as exc:
                return self._failed(sha, str(exc))
            self._forget(sha)
            self._index[sha] = (path, len(data))
            self._bytes += len(data)
            self._evict()
        return path

    def path_of(self, image_sha256: str) -> Path | None:
        """The kept file of an image, or None when it is not (or no longer) kept."""
        with self._lock:
            entry = self._index.get(image_sha256)
        if entry is not None and entry[0].is_file():
            return entry[0]
        return kept_path(self.directory, image_sha256)

    def is_kept(self, image_sha256: str) -> bool:
        """True when the image is on disk and its bytes still match its sha256."""
        path = self.path_of(image_sha256)
        return path is not None and verify_kept(path, image_sha256)

    # -- internals (called with the lock held) ------------------------------------------------

    def _scan(self) -> None:
        found = []
        for path in self.directory.iterdir():
            stem, _, ext = path.name.partition(".")
            if len(stem) == 64 and ext in EXTENSIONS and path.is_file():
                st = path.stat()
                found.append((st.st_mtime, stem, path, st.st_size))
        for _, sha, path, size in sorted(found):
            self._index[sha] = (path, size)
            self._bytes += size
        self._evict()

    def _no_room(self, size: int) -> str:
        """Why ``size`` more bytes must not be written now ('' when they may)."""
        if size > self.max_bytes:
            return f"image of {size} bytes exceeds the keep limit of {self.max_bytes} bytes"
        usage = shutil.disk_usage(self.directory)
        floor = max(self.min_free_bytes, int(self.min_free_fraction * usage.total))
        if usage.free - size < floor:
            return (f"file system nearly full ({usage.free} bytes free, keeping needs "
                    f"{floor} bytes to stay free)")
        return ""

    def _failed(self, sha: str, reason: str) -> None:
        logger.warning("not keeping image %s in %s: %s", sha[:12], self.directory, reason)
        if self.on_failure is not None:
            self.on_failure()
        return None

    def _forget(self, sha: str) -> None:
        entry = self._index.pop(sha, None)
        if entry is not None:
            self._bytes -= entry[1]

    def _evict(self) -> None:
        while self._index and (len(self._index) > self.max_files or self._bytes > self.max_bytes):
            sha, (path, size) = self._index.popitem(last=False)
            self._bytes -= size
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                logger.warning("cannot remove kept image %s: %s", path, exc)
