"""Append-only log of every line-side decision, in SQLite.

Why SQLite: a decision that was sent to the line must be traceable later (which image, which
bundle, which threshold), and the device may lose power or have the server killed at any
moment. SQLite in WAL mode gives atomic, crash-safe commits in one file with no service to run,
concurrent readers while the server writes (``o2n-edge results export`` against a live log),
and a format every tool can open.

Durability choice: ``synchronous=FULL``. In WAL mode ``NORMAL`` already survives a process
crash (``kill -9``): a committed row is in the WAL file, and the OS holds it. It does *not*
survive a power cut or kernel panic: the last transactions before the cut may roll back. A
line-side box is exactly where power is pulled, and an inspection record the line acted on is
worth one ``fsync`` per row (measured ~4 ms per append on a virtual disk vs ~0.02 ms with
NORMAL; next to tens of milliseconds of inference). So every ``append`` returns only after its
row is on disk. Deployments that prefer throughput can set ``SYNCHRONOUS = "NORMAL"``.

Operator verdicts live in the same file (table ``feedback``, see :mod:`feedback_log`): a verdict
is about one logged decision, and keeping both in one SQLite file keeps them in one backup, one
export and one transaction when a verdict is checked against its decision.

Thread safety: one connection guarded by a lock. SQLite serialises writers anyway, and the
server's worker pool is small, so one connection is simpler than a connection per thread and
has nothing to leak when threads come and go.

numpy-free and torch-free: the runtime and the export CLI both import this.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Iterable, Literal

from o2n_edge.atomic import atomic_open
from o2n_edge.runtime.feedback_log import FEEDBACK_SCHEMA, FeedbackTable

# WAL: readers never block the writer, and a torn write cannot corrupt committed rows.
JOURNAL_MODE = "WAL"
# FULL: fsync the WAL on every commit, so a committed decision survives a power cut (see above).
SYNCHRONOUS = "FULL"
# How long a writer waits for another process's lock (e.g. an export) before failing.
BUSY_TIMEOUT_MS = 5000
# Bumped when the table layout changes; a log with a newer schema is refused, not guessed at.
# 2: results.request_id (the id the HTTP answer named) and the feedback table.
SCHEMA_VERSION = 2
# One fixed ISO-8601 UTC layout, so string order equals time order (used by ``since``).
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
# Longest `source` kept: it comes from clients, so it is bounded.
MAX_SOURCE_CHARS = 200

COLUMNS = (
    "id",
    "time_utc",
    "image_sha256",
    "score",
    "decision",
    "threshold",
    "bundle_hash",
    "timings_json",
    "source",
    "request_id",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time_utc TEXT NOT NULL,
    image_sha256 TEXT NOT NULL,
    score REAL NOT NULL,
    decision TEXT NOT NULL CHECK (decision IN ('normal', 'anomalous')),
    threshold REAL NOT NULL,
    bundle_hash TEXT NOT NULL,
    timings_json TEXT NOT NULL,
    source TEXT NOT NULL,
    request_id TEXT
);
CREATE INDEX IF NOT EXISTS results_time ON results (time_utc);
""" + FEEDBACK_SCHEMA
# Columns added after a table first shipped: an older log gets them by ALTER TABLE on open
# (existing rows read NULL), so a log written by any earlier o2n-edge keeps working.
ADDED_COLUMNS: dict[str, dict[str, str]] = {"results": {"request_id": "TEXT"}}
# Indexes on added columns: created after the migration, since the column may be new.
LATE_INDEXES = ("CREATE INDEX IF NOT EXISTS results_request ON results (request_id)",)


class ResultsLogError(RuntimeError):
    """The log cannot be opened or used (wrong file, newer schema, unwritable)."""


def utc_now() -> str:
    """Current time in the log's fixed ISO layout (microseconds, 'Z')."""
    return datetime.now(timezone.utc).strftime(TIME_FORMAT)


def _as_time(value: str | datetime) -> str:
    """Normalise a ``since`` bound to the stored layout so string comparison is time order."""
    if isinstance(value, str):
        text = value.strip()
        if text.endswith("Z"):
            text = text[:-1] + "+00:00"
        try:
            value = datetime.fromisoformat(text)
        except ValueError as exc:
            raise ValueError(f"since must be an ISO-8601 time, got {value!r}") from exc
    if value.tzinfo is None:  # naive times are taken as UTC: the log has no local time
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).strftime(TIME_FORMAT)


def _decision_text(decision: bool | str) -> str:
    """Accept the runtime's bool (True = anomalous) or the JSON answer's text."""
    if isinstance(decision, str):
        text = decision.strip().lower()
        if text not in ("normal", "anomalous"):
            raise ValueError(f"decision must be 'normal' or 'anomalous', got {decision!r}")
        return text
    return "anomalous" if bool(decision) else "normal"


def _migrate(conn: sqlite3.Connection) -> None:
    """Add the columns a log written by an older o2n-edge lacks (see ``ADDED_COLUMNS``)."""
    for table, columns in ADDED_COLUMNS.items():
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        for name, kind in columns.items():
            if name not in have:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
    for sql in LATE_INDEXES:
        conn.execute(sql)


class ResultsLog(FeedbackTable):
    """A thread-safe, crash-safe, append-only SQLite log of decisions and operator verdicts.

    Verdict methods (``add_feedback``, ``feedback_for``, ``feedback_rows``) come from
    :class:`~o2n_edge.runtime.feedback_log.FeedbackTable`.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                str(self.path),
                timeout=BUSY_TIMEOUT_MS / 1000,
                check_same_thread=False,  # guarded by self._lock instead
                isolation_level=None,  # autocommit; we open transactions explicitly
            )
        except (OSError, sqlite3.Error) as exc:
            raise ResultsLogError(f"{self.path}: cannot open results log ({exc})") from exc
        self._conn: sqlite3.Connection | None = conn
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = conn.execute(f"PRAGMA journal_mode = {JOURNAL_MODE}").fetchone()[0]
            if str(mode).lower() != JOURNAL_MODE.lower():
                raise ResultsLogError(f"{self.path}: cannot switch to WAL mode (got {mode!r})")
            conn.execute(f"PRAGMA synchronous = {SYNCHRONOUS}")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ResultsLogError(
                    f"{self.path}: results log schema {version} is newer than this "
                    f"o2n-edge ({SCHEMA_VERSION}); upgrade o2n-edge to read it"
                )
            conn.executescript(_SCHEMA)
            _migrate(conn)
            if version < SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise ResultsLogError(f"{self.path}: not a usable results log ({exc})") from exc
        except ResultsLogError:
            conn.close()
            raise

    # -- writing -------------------------------------------------------------------------

    def append(
        self,
        *,
        image_sha256: str,
        score: float,
        decision: bool | str,
        threshold: float,
        bundle_hash: str,
        timings: dict[str, float] | None = None,
        source: str = "",
        time_utc: str | None = None,
        request_id: str | None = None,
    ) -> int:
        """Commit one decision and return its id; the row is durable when this returns.

        The server calls this *before* answering, so the line never acts on a decision that
        is not on record. ``request_id`` is the id the HTTP answer names, so a later verdict
        (``POST /v1/feedback``) can find the decision it is about.
        """
        row = (
            time_utc or utc_now(),
            str(image_sha256),
            float(score),
            _decision_text(decision),
            float(threshold),
            str(bundle_hash),
            json.dumps({k: round(float(v), 3) for k, v in (timings or {}).items()}),
            str(source)[:MAX_SOURCE_CHARS],
            None if request_id is None else str(request_id),
        )
        with self._lock:
            conn = self._live()
            cur = conn.execute(
                "INSERT INTO results (time_utc, image_sha256, score, decision, threshold, "
                "bundle_hash, timings_json, source, request_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )  # autocommit: the INSERT is its own transaction, fsynced (synchronous=FULL)
            return int(cur.lastrowid)

    # -- reading -------------------------------------------------------------------------

    def read(
        self,
        since: str | datetime | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[dict[str, Any]]:
        """Rows as dicts (``timings`` parsed), oldest first unless ``newest_first``.

        ``since`` keeps rows at or after that time (ISO string or datetime; naive = UTC).
        ``limit`` keeps the *most recent* ``limit`` of them: an operator asks for "the last N".
        """
        where, params = "", []
        if since is not None:
            where, params = "WHERE time_utc >= ?", [_as_time(since)]
        sql = f"SELECT {', '.join(COLUMNS)} FROM results {where} ORDER BY id DESC"
        if limit is not None:
            if int(limit) < 0:
                raise ValueError(f"limit must be >= 0, got {limit}")
            sql += " LIMIT ?"
            params.append(int(limit))
        with self._lock:
            rows = self._live().execute(sql, params).fetchall()
        out = [self._row_dict(r) for r in rows]
        return out if newest_first else out[::-1]

    def count(self) -> int:
        """Number of rows logged."""
        with self._lock:
            return int(self._live().execute("SELECT COUNT(*) FROM results").fetchone()[0])

    def writable(self) -> tuple[bool, str]:
        """(ok, detail): can a row be written right now? Used by the server's /readyz.

        Takes and releases the write lock without writing, so a read-only file system, a
        deleted directory or a lock held elsewhere shows up before a decision is lost.
        """
        try:
            with self._lock:
                conn = self._live()
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("ROLLBACK")
        except (sqlite3.Error, ResultsLogError) as exc:
            return False, f"{self.path}: not writable ({exc})"
        return True, str(self.path)

    def integrity_check(self) -> str:
        """SQLite's own verdict on the file ('ok' when sound)."""
        with self._lock:
            return str(self._live().execute("PRAGMA integrity_check").fetchone()[0])

    # -- export --------------------------------------------------------------------------

    def to_csv(self, file: str | Path | IO[str]) -> int:
        """Write every row as CSV (header = column names, timings as JSON text); return count."""
        rows = self.read()

        def write(fh: IO[str]) -> None:
            writer = csv.writer(fh)
            writer.writerow(COLUMNS)
            for r in rows:
                writer.writerow(
                    [r[c] if c != "timings_json" else json.dumps(r["timings"]) for c in COLUMNS]
                )

        _with_text_file(file, write)
        return len(rows)

    def to_json(self, file: str | Path | IO[str]) -> int:
        """Write every row as a JSON array of objects; return count."""
        rows = self.read()
        _with_text_file(file, lambda fh: (json.dump(rows, fh, indent=1), fh.write("\n")))
        return len(rows)

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection (idempotent); later calls raise ResultsLogError."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> "ResultsLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _live(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ResultsLogError(f"{self.path}: results log is closed")
        return self._conn

    @staticmethod
    def _row_dict(row: Iterable[Any]) -> dict[str, Any]:
        d = dict(zip(COLUMNS, row))
        try:
            d["timings"] = json.loads(d.pop("timings_json"))
        except (TypeError, ValueError):
            d["timings"] = {}
        return d


def _with_text_file(file: str | Path | IO[str], write: Any) -> None:
    """Write to a path (atomically: temp file + rename) or to an open text stream."""
    if isinstance(file, (str, Path)):
        with atomic_open(file, "w", encoding="utf-8", newline="") as fh:
            write(fh)  # a half-written export never stands under the final name
    else:
        write(file)


def export_results(
    log_path: str | Path, fmt: Literal["csv", "json"] = "csv", out: Path | None = None
) -> int:
    """CLI glue for ``o2n-edge results export``: write the log as CSV/JSON to ``out`` or stdout.

    Refuses a missing log instead of creating an empty one: a typo in the path must not
    look like "no decisions were made".
    """
    path = Path(log_path)
    if not path.is_file():
        raise ResultsLogError(f"{path}: results log not found (pass the server's --log path)")
    if fmt not in ("csv", "json"):
        raise ValueError(f"format must be 'csv' or 'json', got {fmt!r}")
    with ResultsLog(path) as log:
        writer = log.to_csv if fmt == "csv" else log.to_json
        if out is not None:
            return writer(Path(out))
        buf = io.StringIO()
        n = writer(buf)
        sys.stdout.write(buf.getvalue())
        sys.stdout.flush()
        return n
