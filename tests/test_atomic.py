"""Atomic writes: content appears whole or not at all, a failure midway keeps the old file or
directory, and no temporary is left behind either way."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from o2n_edge.atomic import (
    AtomicDir,
    atomic_open,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)


def _names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


class Boom(RuntimeError):
    pass


def test_files_appear_whole(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.json"
    atomic_write_json(target, {"x": 1})
    assert target.read_text() == '{\n  "x": 1\n}\n'
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    with atomic_path(tmp_path / "arr.npy") as tmp:
        np.save(tmp, np.arange(3))  # np.save keeps a name ending in .npy as it is
    assert np.load(tmp_path / "arr.npy").tolist() == [0, 1, 2]
    assert _names(tmp_path) == ["arr.npy", "sub"] and _names(tmp_path / "sub") == ["a.json"]


def test_a_failure_midway_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "log.csv"
    target.write_text("old")
    with pytest.raises(Boom):
        with atomic_open(target, "w", newline="") as fh:
            fh.write("half of the new")
            assert target.read_text() == "old"  # nothing under the final name while writing
            raise Boom
    assert target.read_text() == "old"
    with pytest.raises(TypeError):  # unserializable: fails before touching the disk
        atomic_write_json(target, {"x": object()})
    with pytest.raises(ValueError):
        atomic_write_json(target, {"x": float("nan")}, allow_nan=False)
    with pytest.raises(ValueError, match="mode"):
        with atomic_open(target, "a"):
            pass
    assert target.read_text() == "old" and _names(tmp_path) == ["log.csv"]


def test_directory_is_swapped_in_whole(tmp_path: Path) -> None:
    out = tmp_path / "report"
    with AtomicDir(out) as tmp:
        (tmp / "a.txt").write_text("1")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "1"
    with AtomicDir(out) as tmp:  # replaces the old one, which is then removed
        (tmp / "b.txt").write_text("2")
    assert _names(out) == ["b.txt"] and _names(tmp_path) == ["report"]


def test_directory_failure_keeps_the_old_one(tmp_path: Path) -> None:
    out = tmp_path / "report"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(Boom):
        with AtomicDir(out) as tmp:
            (tmp / "new.txt").write_text("new")
            raise Boom
    assert _names(out) == ["keep.txt"] and _names(tmp_path) == ["report"]
    with pytest.raises(FileExistsError):
        with AtomicDir(out, replace=False):
            pass
    # the target appears while staging: not replaced when replace=False
    fresh = tmp_path / "fresh"
    with pytest.raises(FileExistsError, match="appeared"):
        with AtomicDir(fresh, replace=False) as tmp:
            (tmp / "x").write_text("x")
            fresh.mkdir()
    assert _names(fresh) == [] and _names(tmp_path) == ["fresh", "report"]


def test_failed_rename_puts_the_old_directory_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"v": 1}))
    real_replace = os.replace

    def failing(src: str | Path, dst: str | Path) -> None:
        if ".tmp-" in Path(src).name:  # the staged dir's rename fails (e.g. disk full)
            raise OSError("simulated")
        real_replace(src, dst)

    monkeypatch.setattr("o2n_edge.atomic.os.replace", failing)
    with pytest.raises(OSError, match="simulated"):
        with AtomicDir(out) as tmp:
            (tmp / "manifest.json").write_text(json.dumps({"v": 2}))
    assert json.loads((out / "manifest.json").read_text()) == {"v": 1}
    assert _names(tmp_path) == ["bundle"]
