"""Server overhead: `serve` (FastAPI + uvicorn on 127.0.0.1) vs the in-process pipeline.

Why both in one run: the question is what HTTP, multipart-free raw upload, JPEG decoding in the
worker, the results log's durable commit and JSON encoding add on top of inspection, so both
paths score the same JPEG bytes with the same pipeline object, alternating phases, at 1 and N
concurrent clients. The in-process path decodes the same JPEG bytes (the server must too), so
the difference is the serving stack alone. At one client the two paths alternate request by
request (load drift on a shared host hits both alike); at N clients each path runs its own
phase (concurrency cannot be interleaved), so those rows carry the drift. Both paths run one
inspection at a time, so at N clients latency is mostly queueing and requests/s is the number to
compare: the server's queue is first come, first served (mean latency ~N x one inspection),
while the in-process clients share a Python lock, which is not fair (a low p50, a high mean).
Loopback only; every phase is bounded by a request count and a time limit.

Usage: python -m benchmarks.server_load --bundle bundles/hazelnut-lite --data ../shared/data/hazelnut_toy \
    --category hazelnut
Sends the category's real test JPEGs. Writes benchmarks/results/server_lite.{json,md}.
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks.harness import RESULTS, machine_stamp, percentiles, run_clients, set_threads, stamp_lines, write_result

LOOPBACK = "127.0.0.1"
REQUESTS_PER_CLIENT = 40
PHASE_TIME_LIMIT_S = 60.0
START_TIMEOUT_S = 30.0
OVERHEAD_TARGET = 0.15  # serve adds < 15% at one client


class _Server:
    """uvicorn in a thread on an ephemeral loopback port (the socket is bound here: no race)."""

    def __init__(self, app: Any) -> None:
        from o2n_edge.runtime.server import make_server

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # What `serve` gets from uvicorn's own listener: without TCP_NODELAY on a socket handed in
        # via ``sockets=``, each response's body waits for the client's delayed ACK of its headers
        # (~40 ms per request on Linux loopback, measured), which is this harness, not the server.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.bind((LOOPBACK, 0))
        self.url = f"http://{LOOPBACK}:{self.sock.getsockname()[1]}"
        self.server = make_server(app, LOOPBACK, self.sock.getsockname()[1], 5.0, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "_Server":
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(15.0)


def _phase(work: Callable[[int], None], clients: int, per_client: int) -> dict[str, Any]:
    """``clients`` threads, each calling ``work`` ``per_client`` times (or until the time limit)."""
    lat, _, wall = run_clients(lambda _cid, request: work(request), clients, per_client, PHASE_TIME_LIMIT_S)
    p = percentiles(lat)
    p["p95"] = round(float(np.percentile(lat, 95)), 3) if lat else None
    return {"clients": clients, "requests": len(lat), "wall_s": round(wall, 2),
            "requests_per_s": round(len(lat) / wall, 3), "latency_ms": p}


def _interleaved_one_client(a: Callable[[int], None], b: Callable[[int], None], n: int) -> tuple[dict, dict]:
    """One client alternating the two paths request by request: load drift hits both alike."""
    lat: dict[str, list[float]] = {"a": [], "b": []}
    t_spent = {"a": 0.0, "b": 0.0}
    deadline = time.perf_counter() + 2 * PHASE_TIME_LIMIT_S
    for i in range(n):
        if time.perf_counter() > deadline:
            break
        for key, fn in (("a", a), ("b", b)):
            t0 = time.perf_counter()
            fn(i)
            dt = time.perf_counter() - t0
            lat[key].append(dt * 1000.0)
            t_spent[key] += dt
    out = []
    for key in ("a", "b"):
        p = percentiles(lat[key])
        p["p95"] = round(float(np.percentile(lat[key], 95)), 3)
        out.append({"clients": 1, "requests": len(lat[key]), "wall_s": round(t_spent[key], 2),
                    "requests_per_s": round(len(lat[key]) / t_spent[key], 3), "latency_ms": p,
                    "mode": "interleaved request by request with the other path"})
    return out[0], out[1]


def bench_server(bundle: Path, threads: int, jpegs: list[bytes], clients: tuple[int, ...] = (1, 4),
                 per_client: int = REQUESTS_PER_CLIENT, warmup: int = 3) -> dict[str, Any]:
    """Requests/s and latency of `serve` vs in-process at each client count."""
    import httpx

    from o2n_edge.data.images import decode_image
    from o2n_edge.runtime.pipeline import OrtPipeline, SessionOptions
    from o2n_edge.runtime.results_log import ResultsLog
    from o2n_edge.runtime.server import WORKERS, create_app

    pipe = OrtPipeline(bundle, SessionOptions(intra_op_threads=int(threads), inter_op_threads=1))
    lock = threading.Lock()  # the server runs one inspection at a time (WORKERS); so does in-process

    def in_process(i: int) -> None:
        with lock:
            image = decode_image(jpegs[i % len(jpegs)], "bench.jpg")
            pipe.inspect(image)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        log = ResultsLog(Path(tmp) / "results.db")
        app = create_app(pipe, log)
        with _Server(app) as srv:
            tls = threading.local()

            def over_http(i: int) -> None:
                if not hasattr(tls, "client"):
                    tls.client = httpx.Client(base_url=srv.url, timeout=60.0)
                r = tls.client.post("/v1/inspect", content=jpegs[i % len(jpegs)],
                                    headers={"content-type": "image/jpeg"})
                r.raise_for_status()

            for i in range(warmup):
                in_process(i)
                over_http(i)
            for c in clients:
                if c == 1:
                    a, b = _interleaved_one_client(in_process, over_http, per_client)
                else:
                    a = _phase(in_process, c, per_client)
                    b = _phase(over_http, c, per_client)
                overhead_mean = b["latency_ms"]["mean"] / a["latency_ms"]["mean"] - 1.0
                rows.append({"clients": c, "in_process": a, "serve": b,
                             "serve_overhead_mean": round(overhead_mean, 4),
                             "serve_throughput_ratio": round(b["requests_per_s"] / a["requests_per_s"], 4)})
        log.close()
    one = next((r for r in rows if r["clients"] == 1), None)
    targets = []
    if one:
        targets.append({"target": f"serve adds < {100 * OVERHEAD_TARGET:.0f}% mean latency at one client",
                        "measured": f"{100 * one['serve_overhead_mean']:+.1f}%",
                        "met": one["serve_overhead_mean"] < OVERHEAD_TARGET})
    return {"kind": "server", "bundle": str(bundle), "profile": pipe.manifest["profile"], "server_workers": WORKERS,
            "per_client": per_client, "phase_time_limit_s": PHASE_TIME_LIMIT_S, "rows": rows, "targets": targets}


def server_markdown(doc: dict[str, Any]) -> str:
    """The server result as markdown."""
    lines = [f"# {doc['name']}", "", *stamp_lines(doc["machine"]), "", doc.get("note", ""), ""]
    for r in doc["results"]:
        lines += [f"## {r['profile']} (`{r['bundle']}`), server workers {r['server_workers']}", "",
                  "| clients | path | requests | req/s | p50 ms | p95 ms | mean ms |", "|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            for path in ("in_process", "serve"):
                x = row[path]
                lines.append(f"| {row['clients']} | {path} | {x['requests']} | {x['requests_per_s']:.2f} | "
                             f"{x['latency_ms']['p50']:.1f} | {x['latency_ms']['p95']:.1f} | {x['latency_ms']['mean']:.1f} |")
            lines.append(f"| {row['clients']} | serve overhead | | {100 * (row['serve_throughput_ratio'] - 1):+.1f}% req/s | "
                         f"| | {100 * row['serve_overhead_mean']:+.1f}% |")
        lines += ["", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |" for t in r["targets"]]
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Command line of the study."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--category", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--per-client", type=int, default=REQUESTS_PER_CLIENT)
    p.add_argument("--name", default="server_lite")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    from o2n_edge.data import load_dataset

    set_threads(a.threads)
    ds = load_dataset(a.data, None, a.category)
    jpegs = [s.path.read_bytes() for s in ds.test]
    note = " ".join(__doc__.split("Usage:")[0].split())
    doc = {"name": a.name, "machine": machine_stamp(a.threads), "note": note,
           "results": [bench_server(a.bundle, a.threads, jpegs, per_client=a.per_client)]}
    write_result(a.out, a.name, doc, server_markdown(doc))
    print(server_markdown(doc))


if __name__ == "__main__":
    main()
