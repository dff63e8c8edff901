"""The whole learning loop with the real pieces: serve -> verdicts -> learn -> hot reload -> rollback.

One real lite bundle (64 px, 2 hazelnut shots), served by a real uvicorn server on loopback with
an ONNX Runtime inspector, a keep directory, a results log, an inspection token and an admin
token. Images go in over HTTP, operators' verdicts go in over HTTP, ``o2n-edge learn`` runs
through the CLI on exactly what the server wrote, and the learned bundle is swapped in while
inspections keep arriving. The pieces are tested alone elsewhere; this module pins that they
fit: learn reads the server's log and keep directory, a learned bundle reloads, rollback's
parent reloads, and tampering anywhere is refused rather than learned or served.

The module's tests share one server and run in file order; each reload test starts by reading
which bundle is serving, so it also holds when run alone.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from fakes import ServerThread
from typer.testing import CliRunner

from o2n_edge.runtime.bundle import verify_bundle
from o2n_edge.runtime.feedback_log import ReadOnlyLog
from o2n_edge.runtime.image_store import ImageStore, kept_path, verify_kept
from o2n_edge.runtime.manifest import load_manifest
from o2n_edge.runtime.results_log import ResultsLog

TOKEN = "line-token"
ADMIN = "admin-token"
N_GOOD = 6  # good-marked images that learn must add (or hold out for calibration)
FIRE_S = 0.8  # inspections before and after the swap, per phase


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Line:
    """The served line: server, log, keep directory, and the answers it gave."""

    def __init__(self, root: Path, parent: Path) -> None:
        from o2n_edge.runtime.pipeline import OrtPipeline, SessionOptions
        from o2n_edge.runtime.server import create_app

        self.root, self.parent = root, parent
        self.keep, self.db = root / "keep", root / "results.sqlite"
        self.log = ResultsLog(self.db)
        inspector = OrtPipeline(parent, SessionOptions(bank_search="numpy"))
        self.parent_hash = inspector.bundle_hash
        app = create_app(inspector, self.log, token=TOKEN, admin_token=ADMIN, bundle_path=parent,
                         store=ImageStore(self.keep))
        self.srv = ServerThread(app).start()
        self.http = httpx.Client(base_url=self.srv.url, timeout=60)
        self.answers: dict[str, dict[str, Any]] = {}  # image file name -> inspect answer

    def inspect(self, data: bytes, token: str = TOKEN) -> httpx.Response:
        return self.http.post("/v1/inspect", content=data, headers={**_auth(token), "content-type": "image/jpeg"})

    def verdict(self, request_id: str, label: str, token: str | None = TOKEN) -> httpx.Response:
        return self.http.post("/v1/feedback", json={"request_id": request_id, "label": label},
                              headers=_auth(token) if token else {})

    def reload(self, bundle: Path) -> httpx.Response:
        return self.http.post("/v1/admin/reload", json={"bundle": str(bundle)}, headers=_auth(ADMIN))

    def serving(self) -> str:
        return str(self.http.get("/readyz").json()["bundle_hash"])

    def close(self) -> None:
        self.http.close()
        self.srv.stop()
        self.log.close()


@pytest.fixture(scope="module")
def parent(lite64_bundle: Path) -> Path:
    """The session's 64-px lite bundle (tests/conftest.py), served and learned from."""
    return lite64_bundle


@pytest.fixture(scope="module")
def line(parent: Path, shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Line]:
    """The server, after it inspected N_GOOD + 1 train goods and one colour defect over HTTP."""
    cat = shared_data / "hazelnut_toy" / "hazelnut"
    ln = Line(tmp_path_factory.mktemp("loop_line"), parent)
    try:
        goods = sorted((cat / "train" / "good").iterdir())[-(N_GOOD + 1):]
        for path in goods + sorted((cat / "test" / "colour").iterdir())[:1]:
            resp = ln.inspect(path.read_bytes())
            assert resp.status_code == 200, resp.text
            ln.answers[path.name] = {**resp.json(), "data": path.read_bytes(), "defect": "colour" in str(path)}
        yield ln
    finally:
        ln.close()


def _goods(ln: Line) -> list[dict[str, Any]]:
    return [a for a in ln.answers.values() if not a["defect"]]


def _defect(ln: Line) -> dict[str, Any]:
    return next(a for a in ln.answers.values() if a["defect"])


@pytest.fixture(scope="module")
def judged(line: Line) -> dict[str, httpx.Response]:
    """Every good part marked good, the defect marked defect, over HTTP (request id -> answer)."""
    out = {}
    for a in line.answers.values():
        out[a["request_id"]] = line.verdict(a["request_id"], "defect" if a["defect"] else "good")
    return out


@pytest.fixture(scope="module")
def learned(line: Line, judged: dict) -> dict[str, Any]:
    """`o2n-edge learn` on the server's log and keep directory, after one good image's kept file rotted."""
    from o2n_edge.cli import app

    rotten = _goods(line)[-1]["image_sha256"]
    path = kept_path(line.keep, rotten)
    assert path is not None
    path.write_bytes(b"overwritten after its verdict")
    new = line.root / "learned"
    t0 = time.perf_counter()
    res = CliRunner().invoke(app, ["learn", str(line.parent), "--log", str(line.db), "--images", str(line.keep),
                                   "--out", str(new), "--json"])
    return {"result": res, "new": new, "rotten": rotten, "seconds": time.perf_counter() - t0}


def test_each_inspection_is_answered_named_logged_and_kept(line: Line) -> None:
    rows = {r["request_id"]: r for r in line.log.read()}
    assert len(line.answers) == N_GOOD + 2
    for a in line.answers.values():
        assert a["request_id"] and a["bundle_hash"] == line.parent_hash and a["kept"] is True
        assert rows[a["request_id"]]["image_sha256"] == a["image_sha256"] == hashlib.sha256(a["data"]).hexdigest()
        assert rows[a["request_id"]]["bundle_hash"] == line.parent_hash
        path = kept_path(line.keep, a["image_sha256"])
        assert path is not None and path.name == f"{a['image_sha256']}.jpg" and verify_kept(path, a["image_sha256"])
    assert _defect(line)["score"] > max(g["score"] for g in _goods(line))


def test_verdicts_are_stored_once_and_refusals_change_nothing(line: Line, judged: dict) -> None:
    assert {r.status_code for r in judged.values()} == {201}, [r.text for r in judged.values()]
    good = _goods(line)[0]
    assert line.verdict("no-such-request", "good").status_code == 404
    bad = line.verdict(good["request_id"], "maybe")
    assert bad.status_code == 422 and bad.json()["error"]
    assert line.verdict(good["request_id"], "defect", token=None).status_code == 401
    assert line.verdict(good["request_id"], "defect", token="wrong").status_code == 401
    again = line.verdict(good["request_id"], "defect")
    assert again.status_code == 409 and again.json()["verdict"]["label"] == "good"
    rows = line.log.feedback_rows()
    assert len(rows) == len(line.answers)
    assert {r["image_sha256"]: r["label"] for r in rows} == {
        a["image_sha256"]: "defect" if a["defect"] else "good" for a in line.answers.values()}
    assert all(r["bundle_hash"] == line.parent_hash for r in rows)
    with ReadOnlyLog(line.db) as ro:  # what learn reads, beside the serving process
        assert ro.feedback_rows() == rows
        line.log.append(image_sha256=_defect(line)["image_sha256"], score=0.0, decision=False, threshold=1.0,
                        bundle_hash=line.parent_hash, request_id="read-only-probe")
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            ro.add_feedback("read-only-probe", "good")
    assert line.log.feedback_for("read-only-probe") is None


def test_learn_reads_what_the_server_wrote_and_only_good_parts_enter(line: Line, learned: dict) -> None:
    res = learned["result"]
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    new = learned["new"]
    assert verify_bundle(new) == [] and verify_bundle(line.parent) == []
    m = load_manifest(new)
    lin = m.lineage
    assert lin is not None and lin.parent_hash == line.parent_hash == load_manifest(line.parent).manifest_sha256
    assert summary["manifest_sha256"] == m.manifest_sha256 != line.parent_hash
    added = {a["sha256"] for a in lin.added or []}
    held = {c["sha256"] for c in lin.calibration or []}
    rotten = learned["rotten"]
    goods = {g["image_sha256"] for g in _goods(line)} - {rotten}
    assert added | held == goods and not added & held and len(added) >= 1
    assert _defect(line)["image_sha256"] not in added | held
    assert {a["rule"] for a in lin.added or []} == {"operator:good"}
    skipped = {s["sha256"]: s["reason"] for s in lin.skipped or []}
    assert set(skipped) == {rotten} and "sha256 mismatch" in skipped[rotten]
    assert learned["seconds"] < 30


def _fire(ln: Line, stop: threading.Event, out: list[tuple[float, int, dict]]) -> None:
    """Inspect the good parts round-robin until ``stop``; record (sent at, status, answer)."""
    goods = _goods(ln)
    with httpx.Client(base_url=ln.srv.url, timeout=60) as c:
        i = 0
        while not stop.is_set():
            sent = time.monotonic()
            r = c.post("/v1/inspect", content=goods[i % len(goods)]["data"],
                       headers={**_auth(TOKEN), "content-type": "image/jpeg"})
            out.append((sent, r.status_code, r.json()))
            i += 1


def _expected_scores(bundle: Path, ln: Line) -> dict[str, float]:
    """Each good part's score under ``bundle``, computed here, away from the server."""
    from o2n_edge.runtime.pipeline import OrtPipeline, SessionOptions

    pipe = OrtPipeline(bundle, SessionOptions(bank_search="numpy"))
    return {g["image_sha256"]: float(pipe.inspect(pipe.decode(g["data"], "x.jpg")).score) for g in _goods(ln)}


def test_a_learned_bundle_is_swapped_in_under_load_without_a_failed_or_mixed_answer(
        line: Line, learned: dict) -> None:
    new = learned["new"]
    new_hash = load_manifest(new).manifest_sha256
    if line.serving() != line.parent_hash:
        assert line.reload(line.parent).status_code == 200
    expected = {line.parent_hash: _expected_scores(line.parent, line), new_hash: _expected_scores(new, line)}
    assert expected[line.parent_hash] != expected[new_hash]  # the added images changed the bank
    answers: list[tuple[float, int, dict]] = []
    stop = threading.Event()
    firing = threading.Thread(target=_fire, args=(line, stop, answers))
    firing.start()
    try:
        time.sleep(FIRE_S)
        resp = line.reload(new)
        swapped_at = time.monotonic()
        time.sleep(FIRE_S)
    finally:
        stop.set()
        firing.join()
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"bundle_hash": new_hash, "previous": line.parent_hash, "bundle": str(new)}
    assert answers and all(status == 200 for _, status, _ in answers), {s for _, s, _ in answers}
    rows = {r["request_id"]: r for r in line.log.read()}
    for _, _, body in answers:  # each answer names the bundle that scored it, and so does its row
        assert body["score"] == pytest.approx(expected[body["bundle_hash"]][body["image_sha256"]], rel=1e-4, abs=1e-5)
        assert rows[body["request_id"]]["bundle_hash"] == body["bundle_hash"]
    hashes = [body["bundle_hash"] for _, _, body in sorted(answers, key=lambda x: x[0])]
    assert hashes[0] == line.parent_hash and hashes[-1] == new_hash
    assert hashes == sorted(hashes, key=lambda h: h == new_hash)  # old ones, then new ones: no going back
    assert all(body["bundle_hash"] == new_hash for sent, _, body in answers if sent > swapped_at)
    assert line.serving() == new_hash
    print(f"{len(hashes)} inspections: {hashes.count(line.parent_hash)} on the parent, {hashes.count(new_hash)} learned")
    assert line.inspect(_goods(line)[0]["data"]).json()["bundle_hash"] == new_hash


def test_rollback_gives_the_parent_back_and_serving_it_names_the_parent_again(line: Line, learned: dict) -> None:
    from o2n_edge.cli import app

    new = learned["new"]
    res = CliRunner().invoke(app, ["learn", "--rollback", str(new), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["parent_hash"] == line.parent_hash and Path(doc["parent"]) == line.parent.resolve()
    if line.serving() != load_manifest(new).manifest_sha256:
        assert line.reload(new).status_code == 200
    resp = line.reload(Path(doc["parent"]))
    assert resp.status_code == 200, resp.text
    assert resp.json()["bundle_hash"] == line.parent_hash
    answer = line.inspect(_goods(line)[0]["data"]).json()
    assert answer["bundle_hash"] == line.parent_hash and answer["score"] == pytest.approx(_goods(line)[0]["score"])


def test_a_tampered_bundle_is_refused_and_the_server_keeps_its_bundle(line: Line, learned: dict) -> None:
    tampered = line.root / "tampered"
    shutil.copytree(learned["new"], tampered)
    bank = tampered / "memory_bank.npy"
    data = bytearray(bank.read_bytes())
    data[-1] ^= 0x01  # one byte of one float: the file still loads, only its hash tells
    bank.write_bytes(bytes(data))
    before = line.serving()
    resp = line.reload(tampered)
    assert resp.status_code == 409 and "memory_bank.npy" in resp.json()["detail"], resp.text
    assert "sha256 mismatch" in resp.json()["detail"]
    assert line.serving() == before
    answer = line.inspect(_goods(line)[0]["data"])
    assert answer.status_code == 200 and answer.json()["bundle_hash"] == before
