"""Hot reload: a new bundle swapped in without dropping or mixing requests; a bad one refused.

The bundles are fakes (:func:`fakes.write_fake_bundle`): a hashed file and a loader that refuses
it when the hash no longer matches, so the swap logic is tested without ONNX sessions. One test
uses the real loader on a directory that is not a bundle, to pin that its refusal reaches the
client. The concurrent test drives a real uvicorn server from client threads across a reload.
"""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fakes import ServerThread, load_fake_bundle, write_fake_bundle
from fastapi.testclient import TestClient
from PIL import Image

from o2n_edge.runtime.reload import InspectorSlot, install_sighup
from o2n_edge.runtime.results_log import ResultsLog
from o2n_edge.runtime.server import create_app

ADMIN = "admin-secret"
TOKEN = "line-token"
N_CLIENTS = 4
INFER_DELAY_S = 0.02
LOAD_S = 0.3  # a slow load: the old bundle must keep serving meanwhile
PHASE_S = 0.6
TIME_CAP_S = 60.0


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def bundles(tmp_path: Path) -> tuple[Path, str, Path, str]:
    """Bundle a (threshold 128, the start) and bundle b (threshold 0: every part anomalous)."""
    a, b = tmp_path / "bundle_a", tmp_path / "bundle_b"
    return a, write_fake_bundle(a, 128.0, "a"), b, write_fake_bundle(b, 0.0, "b")


def corrupt(path: Path) -> None:
    (path / "fake_bundle.json").write_text('{"threshold": 1.0, "tag": "edited by hand"}')


def test_reload_needs_the_admin_token(tmp_path: Path) -> None:
    a, _ha, _b, _hb = bundles(tmp_path)
    with ResultsLog(tmp_path / "log.db") as log:
        off = TestClient(create_app(load_fake_bundle(a), log, token=TOKEN, bundle_path=a))
        resp = off.post("/v1/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
        assert resp.status_code == 403 and "--admin-token" in resp.json()["detail"]
        on = TestClient(create_app(load_fake_bundle(a), log, token=TOKEN, admin_token=ADMIN,
                                   bundle_path=a, loader=load_fake_bundle))
        assert on.post("/v1/admin/reload").status_code == 401
        wrong = on.post("/v1/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
        assert wrong.status_code == 401  # the line's token is not the admin's


def test_reload_swaps_and_refuses_a_corrupt_bundle(tmp_path: Path) -> None:
    a, ha, b, hb = bundles(tmp_path)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with ResultsLog(tmp_path / "log.db") as log:
        client = TestClient(create_app(load_fake_bundle(a), log, admin_token=ADMIN, bundle_path=a,
                                       loader=load_fake_bundle))
        first = client.post("/v1/inspect", content=png(0), headers={"content-type": "image/png"})
        assert first.json()["bundle_hash"] == ha

        resp = client.post("/v1/admin/reload", json={"bundle": str(b)}, headers=admin)
        assert resp.status_code == 200, resp.text
        assert resp.json()["bundle_hash"] == hb and resp.json()["previous"] == ha
        ready = client.get("/readyz").json()
        assert ready["bundle_hash"] == hb and ready["threshold"] == 0.0 and ready["reloads"] == 1
        metrics = client.get("/metrics").text
        assert f'o2n_bundle_info{{bundle_hash="{hb}"}} 1.0' in metrics and ha not in metrics
        assert "o2n_threshold 0.0" in metrics
        after = client.post("/v1/inspect", content=png(0), headers={"content-type": "image/png"})
        assert after.json()["bundle_hash"] == hb and after.json()["anomalous"]
        assert [r["bundle_hash"] for r in log.read()] == [ha, hb]

        corrupt(a)
        refused = client.post("/v1/admin/reload", headers=admin)  # no body: the start path
        assert refused.status_code == 409, refused.text
        assert "sha256 mismatch" in refused.json()["detail"] and str(a) in refused.json()["detail"]
        missing = client.post("/v1/admin/reload", json={"bundle": str(tmp_path / "nope")}, headers=admin)
        assert missing.status_code == 409 and "not a bundle" in missing.json()["detail"]
        assert client.get("/readyz").json()["bundle_hash"] == hb  # still serving b
        still = client.post("/v1/inspect", content=png(1), headers={"content-type": "image/png"})
        assert still.status_code == 200 and still.json()["bundle_hash"] == hb
        metrics = client.get("/metrics").text
        assert 'o2n_reloads_total{outcome="ok"} 1.0' in metrics
        assert 'o2n_reloads_total{outcome="refused"} 2.0' in metrics


def test_the_real_loader_refuses_a_directory_that_is_not_a_bundle(tmp_path: Path) -> None:
    a, _ha, _b, _hb = bundles(tmp_path)
    (tmp_path / "junk").mkdir()
    with ResultsLog(tmp_path / "log.db") as log:
        client = TestClient(create_app(load_fake_bundle(a), log, admin_token=ADMIN, bundle_path=a))
        resp = client.post("/v1/admin/reload", json={"bundle": str(tmp_path / "junk")},
                           headers={"Authorization": f"Bearer {ADMIN}"})
    assert resp.status_code == 409 and "manifest" in resp.json()["detail"], resp.text


def test_sighup_reloads_the_start_path(tmp_path: Path) -> None:
    a, ha, _b, _hb = bundles(tmp_path)
    slot = InspectorSlot(load_fake_bundle(a), a, load_fake_bundle)
    outcomes: list[bool] = []
    previous = signal.getsignal(signal.SIGHUP)
    try:
        assert install_sighup(slot, outcomes.append)
        new_hash = write_fake_bundle(a, 64.0, "a2")  # the bundle at the start path was replaced
        os.kill(os.getpid(), signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not outcomes and time.monotonic() < deadline:
            time.sleep(0.02)
        assert outcomes == [True] and slot.current.bundle_hash == new_hash != ha
        corrupt(a)
        os.kill(os.getpid(), signal.SIGHUP)
        while len(outcomes) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert outcomes == [True, False] and slot.current.bundle_hash == new_hash
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_concurrent_requests_across_a_reload(tmp_path: Path) -> None:
    """None fails, each answer names the bundle that scored it, later ones name the new one."""
    a, ha, b, hb = bundles(tmp_path)
    (tmp_path / "bad").mkdir()
    write_fake_bundle(tmp_path / "bad", 5.0, "bad")
    corrupt(tmp_path / "bad")
    threshold_of = {ha: 128.0, hb: 0.0}
    log = ResultsLog(tmp_path / "log.db")
    app = create_app(
        load_fake_bundle(a, delay_s=INFER_DELAY_S), log, max_queue=64, admin_token=ADMIN,
        bundle_path=a, loader=lambda p: load_fake_bundle(p, delay_s=INFER_DELAY_S, load_s=LOAD_S),
    )
    answers: list[tuple[float, int, dict]] = []  # (sent at, status, body)
    lock = threading.Lock()
    stop = threading.Event()
    deadline = time.monotonic() + TIME_CAP_S

    def client_loop(cid: int) -> None:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            i = 0
            while not stop.is_set() and time.monotonic() < deadline:
                sent = time.monotonic()
                r = c.post("/v1/inspect", content=png(cid * 1000 + i), headers={"content-type": "image/png"})
                with lock:
                    answers.append((sent, r.status_code, r.json()))
                i += 1

    with ServerThread(app) as srv:
        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(N_CLIENTS)]
        for t in threads:
            t.start()
        admin = {"Authorization": f"Bearer {ADMIN}"}
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            time.sleep(PHASE_S)
            bad = c.post("/v1/admin/reload", json={"bundle": str(tmp_path / "bad")}, headers=admin)
            time.sleep(PHASE_S)
            resp = c.post("/v1/admin/reload", json={"bundle": str(b)}, headers=admin)
            swapped_at = time.monotonic()
            time.sleep(PHASE_S)
        stop.set()
        for t in threads:
            t.join()
    rows = {r["request_id"]: r for r in log.read()}
    log.close()

    assert bad.status_code == 409 and "sha256 mismatch" in bad.json()["detail"]
    assert resp.status_code == 200 and resp.json() == {"bundle_hash": hb, "previous": ha, "bundle": str(b)}
    assert answers and all(status == 200 for _, status, _ in answers), {s for _, s, _ in answers}
    for sent, _, body in answers:
        assert body["threshold"] == threshold_of[body["bundle_hash"]]  # scored by that bundle
        assert rows[body["request_id"]]["bundle_hash"] == body["bundle_hash"]
        if sent > swapped_at:
            assert body["bundle_hash"] == hb
    hashes = [body["bundle_hash"] for _, _, body in sorted(answers, key=lambda x: x[0])]
    first_new = hashes.index(hb)
    assert hashes[:first_new].count(ha) >= N_CLIENTS  # the old one served during the slow load
    assert sum(sent > swapped_at for sent, _, _ in answers) >= N_CLIENTS
    print(f"{len(answers)} requests, {hashes.count(ha)} on the old bundle, {hashes.count(hb)} on the new")


@pytest.mark.parametrize("body", [None, {}])
def test_reload_without_any_path_is_a_clear_error(tmp_path: Path, body: dict | None) -> None:
    a, _ha, _b, _hb = bundles(tmp_path)
    with ResultsLog(tmp_path / "log.db") as log:
        client = TestClient(create_app(load_fake_bundle(a), log, admin_token=ADMIN, loader=load_fake_bundle))
        resp = client.post("/v1/admin/reload", json=body, headers={"Authorization": f"Bearer {ADMIN}"})
    assert resp.status_code == 422 and "no bundle path" in resp.json()["detail"]


def test_serve_cli_wires_keep_reload_and_admin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`o2n-edge serve` hands run_server the store, the admin token, its bundle path and a loader."""
    from typer.testing import CliRunner

    import o2n_edge.cli.runtime_cmds as cmds
    import o2n_edge.runtime.server as server
    from o2n_edge.cli import app
    from o2n_edge.runtime.image_store import ImageStore

    a, ha, b, hb = bundles(tmp_path)
    opened: list[tuple[Path, str, int]] = []

    def fake_open(bundle: Path, backend: str, threads: int):
        opened.append((bundle, backend, threads))
        return load_fake_bundle(bundle)

    seen: dict = {}
    monkeypatch.setattr(cmds, "open_pipeline", fake_open)
    monkeypatch.setattr(server, "run_server", lambda inspector, log_path, **kw: seen.update(kw, inspector=inspector))
    res = CliRunner().invoke(app, [
        "serve", "--bundle", str(a), "--log", str(tmp_path / "log.db"), "--threads", "2",
        "--admin-token", ADMIN, "--keep-images", str(tmp_path / "kept"),
        "--keep-max-files", "7", "--keep-max-bytes", "12345",
    ])
    assert res.exit_code == 0, res.output
    assert seen["inspector"].bundle_hash == ha and seen["admin_token"] == ADMIN
    assert seen["bundle_path"] == a
    store = seen["store"]
    assert isinstance(store, ImageStore) and (store.max_files, store.max_bytes) == (7, 12345)
    assert store.directory == tmp_path / "kept"
    assert seen["loader"](b).bundle_hash == hb and opened[-1] == (b, "cpu", 2)


_SERVE = """
import sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from fakes import load_fake_bundle
from o2n_edge.runtime.results_log import ResultsLog
from o2n_edge.runtime.server import serve
bundle = Path(sys.argv[2])
with ResultsLog(sys.argv[3]) as log:
    serve(load_fake_bundle(bundle), log, port=int(sys.argv[4]), bundle_path=bundle,
          loader=load_fake_bundle, log_level="warning")
"""


def test_sighup_reloads_a_running_serve_process(tmp_path: Path) -> None:
    """`serve` in its own process: SIGHUP swaps the bundle at its start path, SIGTERM still stops it."""
    import socket
    import subprocess
    import sys

    a, ha, _b, _hb = bundles(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-c", _SERVE, str(Path(__file__).parent), str(a),
                             str(tmp_path / "log.db"), str(port)])

    def hash_now() -> str | None:
        try:
            return httpx.get(url + "/readyz", timeout=2).json()["bundle_hash"]
        except httpx.HTTPError:
            return None

    def wait_for(want: str) -> bool:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:
            if hash_now() == want:
                return True
            time.sleep(0.05)
        return False

    try:
        assert wait_for(ha), "serve did not come up"
        new_hash = write_fake_bundle(a, 50.0, "replaced in place")
        proc.send_signal(signal.SIGHUP)
        assert wait_for(new_hash)
        answer = httpx.post(url + "/v1/inspect", content=png(3), headers={"content-type": "image/png"}).json()
        assert answer["bundle_hash"] == new_hash and answer["threshold"] == 50.0
        proc.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal it caught once it has shut down gracefully
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_reload_verifies_a_real_bundle_format(tmp_path: Path) -> None:
    """Through the real verifier (load_bundle): a tampered array is refused, an intact bundle swaps in."""
    from fakes import FakeInspector

    from o2n_edge.runtime.bundle_writer import BundleWriter
    from o2n_edge.runtime.bundle import load_bundle

    def write(out: Path, bank_value: float) -> Path:
        with BundleWriter(out) as w:
            w.add_array("memory_bank", np.full((5, 8), bank_value, dtype=np.float32))
            w.write_manifest({"profile": "tiny", "category": "pcb", "image_size": 32,
                              "threshold": {"value": 0.5, "method": "quantile", "quantile": 0.99}})
        return out

    def loader(path: Path) -> FakeInspector:
        return FakeInspector(bundle_hash=load_bundle(path).manifest_data.manifest_sha256)

    first, second = write(tmp_path / "b1", 1.0), write(tmp_path / "b2", 2.0)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with ResultsLog(tmp_path / "log.db") as log:
        client = TestClient(create_app(loader(first), log, admin_token=ADMIN, bundle_path=first, loader=loader))
        before = client.get("/readyz").json()["bundle_hash"]
        bank = second / "memory_bank.npy"
        good = bank.read_bytes()
        bank.write_bytes(good[:-4] + b"\x00\x00\x80\x3f")  # one float changed, same size
        refused = client.post("/v1/admin/reload", json={"bundle": str(second)}, headers=admin)
        assert refused.status_code == 409 and "memory_bank.npy: sha256 mismatch" in refused.json()["detail"]
        assert client.get("/readyz").json()["bundle_hash"] == before
        bank.write_bytes(good)
        ok = client.post("/v1/admin/reload", json={"bundle": str(second)}, headers=admin)
        assert ok.status_code == 200 and ok.json()["previous"] == before != ok.json()["bundle_hash"]
