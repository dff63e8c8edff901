"""Learning from the line, server side: kept images, operator verdicts, the log migration.

Every refused verdict must be a clear 4xx JSON answer that changes nothing; a keep directory
that cannot take a file must never fail the inspection it belongs to.
"""

from __future__ import annotations

import hashlib
import io
import sqlite3
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
from fakes import FAKE_BUNDLE_HASH, FakeInspector
from fastapi.testclient import TestClient
from PIL import Image

from o2n_edge.runtime.feedback_log import FEEDBACK_COLUMNS
from o2n_edge.runtime.image_store import ImageStore, image_extension, kept_path
from o2n_edge.runtime.results_log import SCHEMA_VERSION, ResultsLog
from o2n_edge.runtime.server import create_app

TOKEN = "line-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def image_bytes(seed: int, fmt: str = "PNG", size: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture
def make_client(tmp_path: Path) -> Iterator[Callable[..., tuple[TestClient, ResultsLog]]]:
    """Factory: TestClient over an app with a token (and optionally a keep store)."""
    made: list[tuple[TestClient, ResultsLog]] = []

    def make(store: ImageStore | None = None) -> tuple[TestClient, ResultsLog]:
        log = ResultsLog(tmp_path / f"log{len(made)}.db")
        app = create_app(FakeInspector(), log, token=TOKEN, store=store)
        client = TestClient(app, raise_server_exceptions=False)
        made.append((client, log))
        return client, log

    yield make
    for client, log in made:
        client.close()
        log.close()


def inspect(client: TestClient, data: bytes) -> dict:
    resp = client.post("/v1/inspect", content=data, headers={"content-type": "image/png", **AUTH})
    assert resp.status_code == 200, resp.text
    return resp.json()


def verdict(client: TestClient, body: object, headers: dict | None = None):
    return client.post("/v1/feedback", json=body, headers=AUTH if headers is None else headers)


def metric(client: TestClient, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def test_verdict_stored_with_what_it_judges(make_client) -> None:
    client, log = make_client()
    data = image_bytes(1)
    answer = inspect(client, data)
    assert answer["bundle_hash"] == FAKE_BUNDLE_HASH and answer["request_id"]
    row = log.read()[-1]
    assert row["request_id"] == answer["request_id"] and row["bundle_hash"] == FAKE_BUNDLE_HASH

    resp = verdict(client, {"request_id": answer["request_id"], "label": "defect", "note": "scratch"})
    assert resp.status_code == 201, resp.text
    record = resp.json()
    assert set(record) == set(FEEDBACK_COLUMNS)
    assert record["label"] == "defect" and record["note"] == "scratch"
    assert record["score"] == pytest.approx(answer["score"])
    assert record["bundle_hash"] == FAKE_BUNDLE_HASH
    assert record["image_sha256"] == hashlib.sha256(data).hexdigest()
    assert record["who"] == "testclient" and record["at"].endswith("Z")
    assert log.feedback_rows() == [record]
    assert log.feedback_for(answer["request_id"]) == record
    assert metric(client, 'o2n_feedback_total{label="defect"}') == 1


def test_bad_verdicts_are_clear_and_change_nothing(make_client) -> None:
    client, log = make_client()
    rid = inspect(client, image_bytes(2))["request_id"]
    cases = [
        (verdict(client, {"request_id": "nope", "label": "good"}), 404, "unknown request"),
        (verdict(client, {"request_id": rid, "label": "fine"}), 422, "label"),
        (verdict(client, {"request_id": rid}), 422, "label"),
        (verdict(client, {"label": "good"}), 422, "request_id"),
        (verdict(client, {"request_id": rid, "label": "good"}, headers={}), 401, "missing bearer"),
        (verdict(client, {"request_id": rid, "label": "good"},
                 headers={"Authorization": "Bearer wrong"}), 401, "wrong bearer"),
        (client.post("/v1/feedback", content=b"{not json", headers={**AUTH, "content-type": "application/json"}),
         422, "invalid"),
    ]
    for resp, status, needle in cases:
        assert resp.status_code == status, (status, resp.text)
        body = resp.json()
        assert {"error", "detail"} <= set(body)
        assert needle in (body["error"] + " " + body["detail"]).lower(), body
    assert log.feedback_rows() == []

    first = verdict(client, {"request_id": rid, "label": "good"})
    assert first.status_code == 201
    second = verdict(client, {"request_id": rid, "label": "defect"})
    assert second.status_code == 409 and "already has the verdict 'good'" in second.json()["detail"]
    assert second.json()["verdict"] == first.json()
    assert [r["label"] for r in log.feedback_rows()] == ["good"]


def test_kept_images_and_verdicts_on_images_gone(make_client, tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "kept", min_free_fraction=0, min_free_bytes=0)
    client, log = make_client(store)
    png, jpg = image_bytes(3), image_bytes(4, "JPEG")
    a, b = inspect(client, png), inspect(client, jpg)
    assert a["kept"] and b["kept"] and "keep" in a["timings_ms"]
    sha_png, sha_jpg = hashlib.sha256(png).hexdigest(), hashlib.sha256(jpg).hexdigest()
    assert (tmp_path / "kept" / f"{sha_png}.png").read_bytes() == png
    assert kept_path(tmp_path / "kept", sha_jpg) == tmp_path / "kept" / f"{sha_jpg}.jpg"

    (tmp_path / "kept" / f"{sha_png}.png").unlink()  # retention (or a person) removed it
    gone = verdict(client, {"request_id": a["request_id"], "label": "good"})
    assert gone.status_code == 410 and "no longer kept" in gone.json()["detail"]
    (tmp_path / "kept" / f"{sha_jpg}.jpg").write_bytes(jpg[:-10] + b"0123456789")  # corrupted
    bad = verdict(client, {"request_id": b["request_id"], "label": "good"})
    assert bad.status_code == 410
    assert log.feedback_rows() == []

    c = inspect(client, image_bytes(5))
    assert verdict(client, {"request_id": c["request_id"], "label": "good"}).status_code == 201


def test_unwritable_keep_dir_never_fails_an_inspection(make_client, tmp_path: Path, caplog) -> None:
    keep = tmp_path / "kept"
    store = ImageStore(keep, min_free_fraction=0, min_free_bytes=0)
    client, log = make_client(store)
    keep.rmdir()
    keep.write_bytes(b"a file where the directory was")  # every write fails, even as root
    answer = inspect(client, image_bytes(6))
    assert answer["kept"] is False and log.count() == 1
    assert metric(client, "o2n_keep_failures_total") == 1
    assert any("not keeping image" in r.getMessage() for r in caplog.records)
    # the verdict on it is refused as "not kept" (the learning step would have no image)
    assert verdict(client, {"request_id": answer["request_id"], "label": "good"}).status_code == 410


def test_full_file_system_stops_keeping(make_client, tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "kept", min_free_fraction=1.0)  # "needs 100% free": never room
    client, _log = make_client(store)
    assert inspect(client, image_bytes(7))["kept"] is False
    assert list((tmp_path / "kept").iterdir()) == []
    assert metric(client, "o2n_keep_failures_total") == 1


def test_retention_oldest_first_by_files_and_bytes(tmp_path: Path) -> None:
    blobs = [image_bytes(i) for i in range(6)]
    store = ImageStore(tmp_path / "k", max_files=3, min_free_fraction=0, min_free_bytes=0)
    shas = [hashlib.sha256(b).hexdigest() for b in blobs]
    for blob, sha in zip(blobs, shas):
        assert store.keep(blob, sha) is not None
    assert store.count == 3
    assert [s for s in shas if store.is_kept(s)] == shas[3:]

    size = len(blobs[0])
    by_bytes = ImageStore(tmp_path / "b", max_bytes=2 * size + size // 2,
                          min_free_fraction=0, min_free_bytes=0)
    for blob, sha in zip(blobs[:4], shas[:4]):
        by_bytes.keep(blob, sha)
    assert by_bytes.count == 2 and by_bytes.total_bytes <= 2 * size + size // 2
    assert by_bytes.is_kept(shas[3]) and not by_bytes.is_kept(shas[0])

    # a restart sees what is on disk, oldest first, and keeps enforcing the limits
    again = ImageStore(tmp_path / "k", max_files=2, min_free_fraction=0, min_free_bytes=0)
    assert again.count == 2 and sorted(p.name[:64] for p in (tmp_path / "k").iterdir()) == sorted(shas[4:])


def test_image_extension() -> None:
    assert image_extension(image_bytes(0)) == "png"
    assert image_extension(image_bytes(0, "JPEG")) == "jpg"
    assert image_extension(image_bytes(0, "BMP")) == "bmp"
    assert image_extension(image_bytes(0, "WEBP")) == "webp"
    assert image_extension(b"????") == "bin"


V1_SCHEMA = """
CREATE TABLE results (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time_utc TEXT NOT NULL, image_sha256 TEXT NOT NULL,
    score REAL NOT NULL, decision TEXT NOT NULL, threshold REAL NOT NULL,
    bundle_hash TEXT NOT NULL, timings_json TEXT NOT NULL, source TEXT NOT NULL);
INSERT INTO results (time_utc, image_sha256, score, decision, threshold, bundle_hash, timings_json, source)
VALUES ('2024-01-01T00:00:00.000000Z', 'aa', 1.0, 'normal', 2.0, 'b', '{}', 'old');
PRAGMA user_version = 1;
"""


def test_an_older_log_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path)
    conn.executescript(V1_SCHEMA)
    conn.close()
    with ResultsLog(path) as log:
        old = log.read()
        assert len(old) == 1 and old[0]["request_id"] is None
        log.append(image_sha256="bb", score=3.0, decision=True, threshold=2.0, bundle_hash="b",
                   request_id="r1")
        log.add_feedback("r1", "defect", who="test")
        assert [r["request_id"] for r in log.feedback_rows()] == ["r1"]
        assert log._live().execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    with ResultsLog(path) as log:  # opening again changes nothing
        assert log.count() == 2 and len(log.feedback_rows()) == 1
