"""Operator verdicts on logged decisions: the ``feedback`` table of the results log.

Why verdicts sit beside the decisions, in the same SQLite file: a verdict is only worth
something together with what it judges (the score, the bundle that gave it, the image), and
copying those into the verdict row when it is written keeps the row meaningful even after the
results table is exported or trimmed. One verdict per request (``request_id`` is the primary
key): a part is judged once; a correction is a deliberate act for later tooling, not a second
click that silently wins.

The learning step reads these rows (:meth:`FeedbackTable.feedback_rows`) together with the
kept images (``<keep dir>/<image_sha256>.<ext>``, see :mod:`image_store`).

This is a mixin of :class:`~o2n_edge.runtime.results_log.ResultsLog` (it uses that class's
connection and lock), kept in its own module so each file stays readable alone.
"""

from __future__ import annotations

import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

# The two verdicts an operator can give; anything else is refused.
LABELS = ("good", "defect")
# Longest free-text note kept (it comes from a client).
MAX_NOTE_CHARS = 1000
MAX_WHO_CHARS = 200
# Same fixed UTC layout as the results table, so string order is time order.
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"

FEEDBACK_COLUMNS = (
    "request_id",
    "label",
    "note",
    "who",
    "at",
    "score",
    "bundle_hash",
    "image_sha256",
)

FEEDBACK_SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    request_id TEXT PRIMARY KEY,
    label TEXT NOT NULL CHECK (label IN ('good', 'defect')),
    note TEXT,
    who TEXT NOT NULL,
    at TEXT NOT NULL,
    score REAL NOT NULL,
    bundle_hash TEXT NOT NULL,
    image_sha256 TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_at ON feedback (at);
"""

_RESULT_COLUMNS = ("id", "time_utc", "image_sha256", "score", "decision", "threshold",
                   "bundle_hash", "source", "request_id")


class FeedbackError(Exception):
    """A verdict that cannot be stored; ``status`` is the HTTP answer it maps to."""

    status = 400
    error = "bad feedback"

    def __init__(self, detail: str, record: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.record = record  # the stored verdict, for a duplicate


class UnknownRequest(FeedbackError):
    """No logged decision has this request id."""

    status = 404
    error = "unknown request"


class DuplicateFeedback(FeedbackError):
    """The request already has a verdict (``record`` holds it)."""

    status = 409
    error = "verdict exists"


class ImageNotKept(FeedbackError):
    """Images are being kept, but this one's file is gone or no longer matches its sha256."""

    status = 410
    error = "image not kept"


def validate_label(label: str) -> str:
    """The label as stored; ValueError for anything but ``good``/``defect``."""
    if label not in LABELS:
        raise ValueError(f"label must be one of {', '.join(LABELS)}, got {label!r}")
    return label


class FeedbackTable:
    """Verdict methods of the results log (needs ``self._lock`` and ``self._live()``)."""

    _lock: threading.Lock

    def _live(self) -> sqlite3.Connection:  # provided by ResultsLog
        raise NotImplementedError

    def result_for_request(self, request_id: str) -> dict[str, Any] | None:
        """The logged decision an HTTP answer named (the newest, if a client reused its id)."""
        with self._lock:
            return self._result_row(self._live(), request_id)

    def add_feedback(
        self,
        request_id: str,
        label: str,
        note: str | None = None,
        who: str = "",
        at: str | None = None,
        check: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Store one verdict and return the stored record (``FEEDBACK_COLUMNS``).

        Raises ValueError (bad label or note), :class:`UnknownRequest`, :class:`DuplicateFeedback`,
        or whatever ``check(result_row)`` raises (the server uses it to refuse a verdict on an
        image that is no longer kept). All checks and the insert run in one write transaction,
        so two operators clicking at once get one stored verdict and one 409, and a refused
        verdict changes nothing.
        """
        validate_label(label)
        if note is not None and len(note) > MAX_NOTE_CHARS:
            raise ValueError(f"note is {len(note)} characters; at most {MAX_NOTE_CHARS}")
        stamp = at or datetime.now(timezone.utc).strftime(TIME_FORMAT)
        with self._lock:
            conn = self._live()
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = self._result_row(conn, request_id)
                if result is None:
                    raise UnknownRequest(f"no logged inspection has request_id {request_id!r}")
                existing = self._feedback_row(conn, request_id)
                if existing is not None:
                    raise DuplicateFeedback(
                        f"request {request_id!r} already has the verdict {existing['label']!r} "
                        f"(given {existing['at']} by {existing['who']})",
                        existing,
                    )
                if check is not None:
                    check(result)
                record = {
                    "request_id": request_id,
                    "label": label,
                    "note": note,
                    "who": str(who)[:MAX_WHO_CHARS],
                    "at": stamp,
                    "score": float(result["score"]),
                    "bundle_hash": str(result["bundle_hash"]),
                    "image_sha256": str(result["image_sha256"]),
                }
                conn.execute(
                    f"INSERT INTO feedback ({', '.join(FEEDBACK_COLUMNS)}) "
                    f"VALUES ({', '.join('?' * len(FEEDBACK_COLUMNS))})",
                    [record[c] for c in FEEDBACK_COLUMNS],
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return record

    def feedback_for(self, request_id: str) -> dict[str, Any] | None:
        """The stored verdict of one request, or None."""
        with self._lock:
            return self._feedback_row(self._live(), request_id)

    def feedback_rows(self) -> list[dict[str, Any]]:
        """Every verdict, oldest first, as dicts with the keys of ``FEEDBACK_COLUMNS``.

        What the learning step reads: ``label`` (``good``/``defect``), ``image_sha256`` (the
        kept file's name), and the ``score``/``bundle_hash`` the verdict answered.
        """
        sql = f"SELECT {', '.join(FEEDBACK_COLUMNS)} FROM feedback ORDER BY at, request_id"
        with self._lock:
            rows = self._live().execute(sql).fetchall()
        return [dict(zip(FEEDBACK_COLUMNS, r)) for r in rows]

    def scored_by(self, bundle_hash: str) -> list[tuple[str, float]]:
        """(image_sha256, score) of every decision ``bundle_hash`` made, oldest first.

        What the learning step's auto-good rule reads: the parent's own scores of the images it saw.
        """
        sql = "SELECT image_sha256, score FROM results WHERE bundle_hash = ? ORDER BY id"
        with self._lock:
            rows = self._live().execute(sql, (bundle_hash,)).fetchall()
        return [(str(sha), float(score)) for sha, score in rows]

    @staticmethod
    def _result_row(conn: sqlite3.Connection, request_id: str) -> dict[str, Any] | None:
        row = conn.execute(
            f"SELECT {', '.join(_RESULT_COLUMNS)} FROM results WHERE request_id = ? "
            "ORDER BY id DESC LIMIT 1",
            (request_id,),
        ).fetchone()
        return dict(zip(_RESULT_COLUMNS, row)) if row else None

    @staticmethod
    def _feedback_row(conn: sqlite3.Connection, request_id: str) -> dict[str, Any] | None:
        row = conn.execute(
            f"SELECT {', '.join(FEEDBACK_COLUMNS)} FROM feedback WHERE request_id = ?",
            (request_id,),
        ).fetchone()
        return dict(zip(FEEDBACK_COLUMNS, row)) if row else None


class ReadOnlyLog(FeedbackTable):
    """A results log opened read-only, for readers beside a running server (``o2n-edge learn``).

    Why not :class:`~o2n_edge.runtime.results_log.ResultsLog`: opening one creates and migrates the
    schema, a write; a reader must never change a log a server owns, nor turn a wrong file into a
    results log. The reads are the same methods, so the table layout is written down only here.
    Raises ``sqlite3.Error`` for a file that cannot be opened or is not SQLite.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(f"file:{self.path.resolve()}?mode=ro", uri=True, check_same_thread=False)

    def has_table(self, name: str) -> bool:
        """Whether the log has table ``name`` (a log from before verdicts has no ``feedback``)."""
        with self._lock:
            sql = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
            return self._conn.execute(sql, (name,)).fetchone() is not None

    def _live(self) -> sqlite3.Connection:
        return self._conn

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()

    def __enter__(self) -> "ReadOnlyLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
