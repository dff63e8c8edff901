"""A real uvicorn server under concurrent load, and graceful shutdown with a request in flight.

Loopback only (127.0.0.1, ephemeral port), a fixed number of requests and a time cap. The
figures (requests, 503s, latency percentiles, RSS growth) are printed for the benchmarks notes;
run with ``-s`` to see them. Speed targets live in benchmarks, not here: the asserts are about
correctness (every answer is 200 or a documented 503, every 200 is logged, memory is bounded).
"""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
from fakes import FakeInspector, ServerThread
from PIL import Image

from o2n_edge.runtime.results_log import ResultsLog
from o2n_edge.runtime.server import create_app

N_CLIENTS = 12
REQUESTS_PER_CLIENT = 20
MAX_QUEUE = 4
INFER_DELAY_S = 0.02
TIME_CAP_S = 60.0
RSS_GROWTH_LIMIT_MB = 50.0
N_DISTINCT_IMAGES = 16
SLOW_DELAY_S = 1.5


def rss_mb() -> float:
    """Resident set size of this process (server threads + clients) from /proc."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    pytest.skip("no /proc/self/status VmRSS on this platform")
    raise AssertionError  # unreachable


def png(i: int, size: int = 96) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_concurrent_load(tmp_path: Path) -> None:
    inspector = FakeInspector(delay_s=INFER_DELAY_S)
    log = ResultsLog(tmp_path / "load.db")
    app = create_app(inspector, log, max_queue=MAX_QUEUE, workers=1)
    images = [png(i) for i in range(N_DISTINCT_IMAGES)]
    results: list[tuple[int, float, dict, dict]] = []  # status, seconds, json, headers
    lock = threading.Lock()
    deadline = time.monotonic() + TIME_CAP_S
    health_latencies: list[float] = []

    with ServerThread(app) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as warm:  # warm-up: imports, caches
            for i in range(3):
                assert warm.post("/v1/inspect", content=images[i]).status_code == 200
        warm_rows = log.count()
        rss_before = rss_mb()

        def client(k: int) -> None:
            with httpx.Client(base_url=srv.url, timeout=30) as http:
                for j in range(REQUESTS_PER_CLIENT):
                    if time.monotonic() > deadline:
                        return
                    data = images[(k * REQUESTS_PER_CLIENT + j) % N_DISTINCT_IMAGES]
                    t0 = time.perf_counter()
                    r = http.post(
                        "/v1/inspect", content=data, headers={"content-type": "image/png"}
                    )
                    dt = time.perf_counter() - t0
                    with lock:
                        results.append((r.status_code, dt, r.json(), dict(r.headers)))

        def prober() -> None:  # the event loop must stay responsive while the model runs
            with httpx.Client(base_url=srv.url, timeout=10) as http:
                while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
                    t0 = time.perf_counter()
                    assert http.get("/healthz").status_code == 200
                    health_latencies.append(time.perf_counter() - t0)
                    time.sleep(0.05)

        t_start = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(N_CLIENTS)]
        for t in threads:
            t.start()
        probe = threading.Thread(target=prober)
        probe.start()
        for t in threads:
            t.join(TIME_CAP_S)
        probe.join(TIME_CAP_S)
        wall = time.perf_counter() - t_start
        metrics_text = httpx.get(srv.url + "/metrics").text
        rss_after = rss_mb()

    statuses = Counter(s for s, *_ in results)
    ok = [(dt, j) for s, dt, j, _ in results if s == 200]
    busy = [(j, h) for s, _, j, h in results if s == 503]
    lat_ok = np.array([dt for dt, _ in ok]) * 1000
    lat_all = np.array([dt for _, dt, _, _ in results]) * 1000
    figures = {
        "requests": len(results),
        "ok_200": len(ok),
        "busy_503": len(busy),
        "wall_s": round(wall, 2),
        "ok_per_s": round(len(ok) / wall, 1),
        "p50_ms_200": round(float(np.percentile(lat_ok, 50)), 1),
        "p95_ms_200": round(float(np.percentile(lat_ok, 95)), 1),
        "p50_ms_all": round(float(np.percentile(lat_all, 50)), 1),
        "p95_ms_all": round(float(np.percentile(lat_all, 95)), 1),
        "healthz_max_ms_under_load": round(max(health_latencies) * 1000, 1),
        "rss_before_mb": round(rss_before, 1),
        "rss_growth_mb": round(rss_after - rss_before, 1),
        "clients": N_CLIENTS,
        "max_queue": MAX_QUEUE,
        "infer_delay_ms": INFER_DELAY_S * 1000,
    }
    print("\nserver load figures:", figures)

    assert len(results) == N_CLIENTS * REQUESTS_PER_CLIENT, "time cap hit"
    assert set(statuses) <= {200, 503}, statuses
    assert ok, "no request succeeded"
    for j, headers in busy:  # documented 503: JSON error + Retry-After
        assert j["error"] == "busy" and int(headers["retry-after"]) >= 1
    rows = log.read()[warm_rows:]
    assert len(rows) == len(ok)
    assert Counter(r["image_sha256"] for r in rows) == Counter(j["image_sha256"] for _, j in ok)
    assert sorted(r["id"] for r in rows) == sorted(j["log_id"] for _, j in ok)
    assert f"o2n_rejected_total {len(busy)}" in metrics_text
    assert rss_after - rss_before < RSS_GROWTH_LIMIT_MB, figures
    log.close()


def test_graceful_shutdown_finishes_in_flight(tmp_path: Path) -> None:
    inspector = FakeInspector(delay_s=SLOW_DELAY_S)
    log = ResultsLog(tmp_path / "graceful.db")
    app = create_app(inspector, log)
    srv = ServerThread(app, graceful_timeout_s=10).start()
    answer: dict = {}

    def slow_request() -> None:
        try:
            r = httpx.post(srv.url + "/v1/inspect", content=png(0), timeout=30)
            answer["status"], answer["json"] = r.status_code, r.json()
        except Exception as exc:  # noqa: BLE001 - reported by the assert below
            answer["error"] = repr(exc)

    t = threading.Thread(target=slow_request)
    t.start()
    try:
        assert inspector.started.wait(10), "request never reached the inspector"
        t_shutdown = time.perf_counter()
        srv.server.should_exit = True  # what SIGTERM/SIGINT do
        time.sleep(0.5)  # uvicorn closes the listener on its next tick
        with pytest.raises(httpx.TransportError):  # no new connections during shutdown
            httpx.get(srv.url + "/healthz", timeout=2)
        t.join(15)
        srv.thread.join(15)
    finally:
        srv.stop()
    print(f"\ngraceful shutdown: in-flight request finished {time.perf_counter() - t_shutdown:.2f}"
          " s after shutdown began")
    assert answer.get("status") == 200, answer
    assert not srv.thread.is_alive(), "server did not stop"
    rows = log.read()
    assert len(rows) == 1 and rows[0]["image_sha256"] == answer["json"]["image_sha256"]
    log.close()
