"""The results log: round trip, exports, thread safety, and durability across kill -9."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from o2n_edge.runtime.results_log import (
    SCHEMA_VERSION,
    ResultsLog,
    ResultsLogError,
    export_results,
)

ROOT = Path(__file__).resolve().parents[1]
KILL_AFTER_ROWS = 40
KILL_TEST_TIMEOUT_S = 30


def _row(i: int, **kw: object) -> dict:
    base = dict(
        image_sha256=f"{i:064x}",
        score=float(i) / 10,
        decision=i % 2 == 0,
        threshold=0.5,
        bundle_hash="bundle-a",
        timings={"decode": 1.5, "total": 10.25},
        source="test",
    )
    base.update(kw)
    return base


def test_append_read_round_trip(tmp_path: Path) -> None:
    with ResultsLog(tmp_path / "log.db") as log:
        ids = [log.append(**_row(i)) for i in range(5)]
        assert ids == [1, 2, 3, 4, 5]
        assert log.count() == 5
        rows = log.read()
    assert [r["id"] for r in rows] == ids
    first = rows[0]
    assert first["decision"] == "anomalous" and rows[1]["decision"] == "normal"
    assert first["timings"] == {"decode": 1.5, "total": 10.25}
    assert first["image_sha256"] == "0" * 64 and first["bundle_hash"] == "bundle-a"
    assert first["time_utc"].endswith("Z")
    datetime.strptime(first["time_utc"], "%Y-%m-%dT%H:%M:%S.%fZ")  # fixed ISO layout


def test_pragmas_wal_and_full_sync(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    with ResultsLog(path) as log:
        log.append(**_row(0))
        conn = log._live()
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_decision_text_and_validation(tmp_path: Path) -> None:
    with ResultsLog(tmp_path / "log.db") as log:
        log.append(**_row(0, decision="NORMAL"))
        log.append(**_row(1, decision="anomalous"))
        with pytest.raises(ValueError, match="decision"):
            log.append(**_row(2, decision="maybe"))
        assert [r["decision"] for r in log.read()] == ["normal", "anomalous"]
        assert log.count() == 2


def test_read_since_limit_order(tmp_path: Path) -> None:
    t0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
    with ResultsLog(tmp_path / "log.db") as log:
        for i in range(10):
            stamp = (t0 + timedelta(seconds=i)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            log.append(**_row(i, time_utc=stamp))
        assert [r["id"] for r in log.read(limit=3)] == [8, 9, 10]  # the last 3, oldest first
        assert [r["id"] for r in log.read(limit=3, newest_first=True)] == [10, 9, 8]
        since = t0 + timedelta(seconds=7)
        assert [r["id"] for r in log.read(since=since)] == [8, 9, 10]
        assert [r["id"] for r in log.read(since="2030-01-01T00:00:07Z")] == [8, 9, 10]
        naive = "2030-01-01T00:00:08"  # naive = UTC
        assert [r["id"] for r in log.read(since=naive)] == [9, 10]
        local = "2030-01-01T01:00:09+01:00"  # other zones are converted
        assert [r["id"] for r in log.read(since=local)] == [10]
        assert log.read(limit=0) == []
        with pytest.raises(ValueError, match="ISO"):
            log.read(since="yesterday")
        with pytest.raises(ValueError, match="limit"):
            log.read(limit=-1)


def test_exports_csv_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "log.db"
    with ResultsLog(path) as log:
        for i in range(3):
            log.append(**_row(i, source='line "1", cam,2'))
        buf = io.StringIO()
        assert log.to_csv(buf) == 3
        assert log.to_json(tmp_path / "out" / "r.json") == 3
    rows = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert len(rows) == 3 and rows[0]["source"] == 'line "1", cam,2'
    assert json.loads(rows[0]["timings_json"]) == {"decode": 1.5, "total": 10.25}
    data = json.loads((tmp_path / "out" / "r.json").read_text())
    assert [d["id"] for d in data] == [1, 2, 3] and data[2]["score"] == pytest.approx(0.2)
    assert not list((tmp_path / "out").glob("*.tmp"))  # atomic write left no temp file

    assert export_results(path, "csv", tmp_path / "e.csv") == 3
    assert (tmp_path / "e.csv").read_text().startswith("id,time_utc,image_sha256")
    assert export_results(path, "json") == 3  # stdout
    assert len(json.loads(capsys.readouterr().out)) == 3
    with pytest.raises(ResultsLogError, match="not found"):
        export_results(tmp_path / "missing.db", "csv")
    assert not (tmp_path / "missing.db").exists()  # a typo does not create an empty log
    with pytest.raises(ValueError, match="format"):
        export_results(path, "xml")  # type: ignore[arg-type]


def test_threads_append_concurrently(tmp_path: Path) -> None:
    n_threads, per_thread = 4, 25
    with ResultsLog(tmp_path / "log.db") as log:

        def work(t: int) -> None:
            for i in range(per_thread):
                log.append(**_row(t * 1000 + i))

        threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        rows = log.read()
        assert len(rows) == n_threads * per_thread
        assert sorted(r["id"] for r in rows) == list(range(1, n_threads * per_thread + 1))
        assert len({r["image_sha256"] for r in rows}) == n_threads * per_thread
        assert log.integrity_check() == "ok"


def test_bad_files_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ResultsLogError, match="not a usable results log"):
        ResultsLog(junk)
    newer = tmp_path / "newer.db"
    conn = sqlite3.connect(newer)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(ResultsLogError, match="newer"):
        ResultsLog(newer)


def test_writable_and_closed(tmp_path: Path) -> None:
    log = ResultsLog(tmp_path / "log.db")
    assert log.writable()[0]
    log.close()
    log.close()  # idempotent
    ok, detail = log.writable()
    assert not ok and "closed" in detail
    with pytest.raises(ResultsLogError, match="closed"):
        log.append(**_row(0))


_WRITER = """
import sys
from o2n_edge.runtime.results_log import ResultsLog
log = ResultsLog(sys.argv[1])
i = 0
while True:
    rid = log.append(image_sha256=f"{i:064x}", score=float(i), decision=i % 2 == 0,
                     threshold=0.5, bundle_hash="b", timings={"t": 1.0}, source="kill-test")
    print(rid, flush=True)  # printed only after the commit returned
    i += 1
"""


def test_survives_kill_minus_9(tmp_path: Path) -> None:
    """Every row whose append() returned is there after SIGKILL, and the file is sound."""
    path = tmp_path / "log.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    committed: list[int] = []
    deadline = time.monotonic() + KILL_TEST_TIMEOUT_S
    try:
        assert proc.stdout is not None
        while len(committed) < KILL_AFTER_ROWS:
            line = proc.stdout.readline()
            if not line:
                pytest.fail(f"writer died early: {proc.stderr.read() if proc.stderr else ''}")
            committed.append(int(line))
            assert time.monotonic() < deadline, "writer too slow"
        os.kill(proc.pid, signal.SIGKILL)  # mid-stream: it is inside its next append
        out, _ = proc.communicate(timeout=10)
        committed += [int(x) for x in out.split()]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with ResultsLog(path) as log:
        assert log.integrity_check() == "ok"
        ids = [r["id"] for r in log.read()]
    assert set(committed) <= set(ids), "a committed row was lost"
    assert ids == list(range(1, len(ids) + 1))  # no holes, no torn rows
    assert len(ids) - len(committed) <= 1  # at most the one in flight at the kill
