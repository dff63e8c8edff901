"""Triton (dynamic batching on) vs `o2n-edge serve`: same bundle, same machine, one run.

Both servers run as their own processes on 127.0.0.1 and score the same real JPEG bytes, sent by
1, 4 and 8 concurrent clients over HTTP (and Triton over gRPC too): `o2n-edge serve` with one
inference worker (its default) and its results log, Triton with the repository's self-contained
Python-backend model (one instance, dynamic batching up to ``max_batch``), since the PyPI
tritonserver has no onnxruntime backend. Both run ONNX Runtime with the same intra-op thread
count. For each client count the paths alternate in 3 rounds (serve, Triton HTTP, Triton gRPC, again, again), so load
drift on a shared host hits all three; req/s = requests / wall summed over the rounds (each
round's req/s is in the JSON); the machine's load average is recorded at start and end. Triton's own statistics give the mean batch it formed (inferences / executions). Every
answer's score is checked against `serve`'s for the same image. Loopback only; every phase is
bounded by a request count and a time limit.

Usage: python -m benchmarks.triton_load --bundle bundles/hazelnut-lite-shots --data ../shared/data/hazelnut_toy \
    --category hazelnut
Needs o2n-edge[triton] (the PyPI tritonserver). Writes benchmarks/results/triton_lite.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks.harness import RESULTS, load_average, machine_stamp, percentiles, run_clients, set_threads, stamp_lines, write_result
from benchmarks.triton_server import LOOPBACK, SITE_ENV, LocalTriton, free_port, unavailable

CLIENTS = (1, 4, 8)
REQUESTS = {1: 60, 4: 24, 8: 15}  # per client, split over the rounds
ROUNDS = 3
PHASE_TIME_LIMIT_S = 90.0
WARMUP = 5
MAX_BATCH = 8
QUEUE_DELAY_US = 2000
SERVE_MAX_QUEUE = 32  # above 8 clients: no 503s in the way of the comparison
START_TIMEOUT_S = 120.0
SCORE_ATOL = 1e-5
INSPECT_MODEL = "o2n_inspect"


class _Serve:
    """`o2n-edge serve` as a subprocess on a free loopback port."""

    def __init__(self, bundle: Path, threads: int, work: Path) -> None:

        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        code = "from o2n_edge.cli import app; app()"
        self.args = [sys.executable, "-c", code, "serve", "--bundle", str(bundle), "--host", LOOPBACK,
                     "--port", str(self.port), "--threads", str(threads), "--log", str(work / "results.db"),
                     "--max-queue", str(SERVE_MAX_QUEUE), "--workers", "1"]
        self.log = open(work / "serve.log", "wb")
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "_Serve":
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"o2n-edge serve exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.25)
        raise RuntimeError("o2n-edge serve did not become ready")

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _merge(clients: int, parts: list[tuple[dict[str, Any], list[float]]]) -> dict[str, Any]:
    """The rounds of one path as one phase: all latencies, total requests over total wall."""
    lat = [x for _, part in parts for x in part]
    wall = sum(stats["wall_s"] for stats, _ in parts)
    rounds = [stats["requests_per_s"] for stats, _ in parts]
    return {"clients": clients, "requests": len(lat), "wall_s": round(wall, 2),
            "requests_per_s": round(len(lat) / wall, 3) if wall else None, "latency_ms": percentiles(lat),
            "rounds_requests_per_s": rounds}


def _phase(work: Callable[[int, int], float], clients: int, per_client: int) -> tuple[dict[str, Any], list[tuple[int, float]], list[float]]:
    """``clients`` threads each calling ``work(client, i)`` ``per_client`` times; returns stats + scores."""
    lat, scores, wall = run_clients(work, clients, per_client, PHASE_TIME_LIMIT_S)
    p = percentiles(lat)
    return ({"clients": clients, "requests": len(lat), "wall_s": round(wall, 4),
             "requests_per_s": round(len(lat) / wall, 3), "latency_ms": p}, scores, lat)


def _triton_counts(url: str) -> tuple[int, int]:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(INSPECT_MODEL)["model_stats"][0]
    finally:
        client.close()
    return int(stats["inference_count"]), int(stats["execution_count"])


def bench_triton(bundle: Path, threads: int, jpegs: list[bytes], clients: tuple[int, ...] = CLIENTS,
                 requests: dict[int, int] | None = None, max_batch: int = MAX_BATCH,
                 queue_delay_us: int = QUEUE_DELAY_US) -> dict[str, Any]:
    """Requests/s and p50/p99 latency of serve, Triton HTTP and Triton gRPC at each client count."""
    import httpx
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from o2n_edge.runtime.bundle import load_bundle
    from o2n_edge.triton.repository import RepositoryOptions, write_repository

    requests = requests or REQUESTS
    manifest = load_bundle(bundle).manifest
    os.environ["OMP_NUM_THREADS"] = str(threads)  # both servers inherit it
    rows: list[dict[str, Any]] = []
    reference: dict[int, float] = {}  # image index -> serve's score
    mismatches: list[float] = []
    with tempfile.TemporaryDirectory(prefix="o2n-triton-bench-") as tmp:
        work = Path(tmp)
        repo = write_repository(bundle, work / "model_repository", RepositoryOptions(
            max_batch=max_batch, queue_delay_us=queue_delay_us, threads=threads))
        with _Serve(bundle, threads, work) as serve, LocalTriton(repo.path, models=[INSPECT_MODEL]) as triton:
            tls = threading.local()

            def via_serve(cid: int, i: int) -> float:
                if getattr(tls, "serve", None) is None:
                    tls.serve = httpx.Client(base_url=serve.url, timeout=120.0)
                r = tls.serve.post("/v1/inspect", content=jpegs[i % len(jpegs)], headers={"content-type": "image/jpeg"})
                r.raise_for_status()
                return float(r.json()["score"])

            def via_triton(grpc: bool) -> Callable[[int, int], float]:
                mod = grpcclient if grpc else httpclient
                key = "grpc" if grpc else "http"

                def call(cid: int, i: int) -> float:
                    client = getattr(tls, key, None)
                    if client is None:
                        client = mod.InferenceServerClient(triton.grpc_url if grpc else triton.http_url)
                        setattr(tls, key, client)
                    inp = mod.InferInput("IMAGE", [1, 1], "BYTES")
                    inp.set_data_from_numpy(np.array([[jpegs[i % len(jpegs)]]], dtype=object))
                    out = [mod.InferRequestedOutput("SCORE")]
                    return float(client.infer(INSPECT_MODEL, [inp], outputs=out).as_numpy("SCORE")[0, 0])

                return call

            paths = {"serve": via_serve, "triton_http": via_triton(False), "triton_grpc": via_triton(True)}
            for i in range(len(jpegs)):  # warm-up doubles as the score reference
                reference[i] = via_serve(0, i)
            for name, fn in paths.items():
                for i in range(WARMUP):
                    fn(0, i)
            for c in clients:
                row: dict[str, Any] = {"clients": c}
                per_round = max(1, requests.get(c, 10) // ROUNDS)
                parts: dict[str, list[tuple[dict[str, Any], list[float]]]] = {name: [] for name in paths}
                batches = {name: [0, 0] for name in paths}
                for _ in range(ROUNDS):  # rounds alternate the paths: drift hits all of them
                    for name, fn in paths.items():
                        before = _triton_counts(triton.http_url) if name != "serve" else None
                        stats, scores, lat = _phase(fn, c, per_round)
                        for idx, s in scores:
                            mismatches.append(abs(s - reference[idx % len(jpegs)]))
                        if before is not None:
                            inf, exe = _triton_counts(triton.http_url)
                            batches[name][0] += inf - before[0]
                            batches[name][1] += exe - before[1]
                        parts[name].append((stats, lat))
                for name in paths:
                    stats = _merge(c, parts[name])
                    if name != "serve":
                        stats["triton_mean_batch"] = round(batches[name][0] / max(1, batches[name][1]), 3)
                    row[name] = stats
                row["triton_http_vs_serve_req_s"] = round(row["triton_http"]["requests_per_s"] / row["serve"]["requests_per_s"], 3)
                rows.append(row)
    return {"kind": "triton_vs_serve", "bundle": str(bundle), "profile": manifest.get("profile"),
            "branches": manifest.get("scoring", {}).get("branches"), "bundle_hash": manifest["manifest_sha256"],
            "images": len(jpegs), "threads": threads, "max_batch": max_batch, "queue_delay_us": queue_delay_us,
            "serve_workers": 1, "triton_instances": 1, "rounds": ROUNDS, "requests_per_client": {str(k): v for k, v in requests.items()},
            "phase_time_limit_s": PHASE_TIME_LIMIT_S, "rows": rows,
            "max_abs_score_diff_vs_serve": float(max(mismatches)) if mismatches else None,
            "scores_agree": bool(mismatches) and max(mismatches) <= SCORE_ATOL,
            "load_average_end": load_average()}


def triton_markdown(doc: dict[str, Any]) -> str:
    """The result as markdown."""
    lines = [f"# {doc['name']}", "", *stamp_lines(doc["machine"]), "", f"`uptime` at start: {doc.get('uptime_start', '')}",
             f"`uptime` at end: {doc.get('uptime_end', '')}", "", f"Command: `{doc.get('command', '')}`", "",
             doc.get("note", ""), ""]
    r = doc["result"]
    lines += [f"Bundle `{r['bundle']}` ({r['profile']}, branches {', '.join(r['branches'] or [])}, "
              f"{r['images']} test images), ONNX Runtime intra-op threads {r['threads']}; Triton: self-contained "
              f"Python-backend model, 1 instance, max batch {r['max_batch']}, queue delay {r['queue_delay_us']} µs; "
              f"serve: 1 worker, results log on. Scores vs serve: max |diff| {r['max_abs_score_diff_vs_serve']:.2e}.", "",
              "| clients | path | requests | req/s | p50 ms | p99 ms | mean ms | Triton mean batch |",
              "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        for path in ("serve", "triton_http", "triton_grpc"):
            x = row[path]
            p = x["latency_ms"]
            lines.append(f"| {row['clients']} | {path} | {x['requests']} | {x['requests_per_s']:.2f} | {p['p50']:.1f} | "
                         f"{p['p99']:.1f} | {p['mean']:.1f} | {x.get('triton_mean_batch', '')} |")
        lines.append(f"| {row['clients']} | Triton HTTP / serve | | {row['triton_http_vs_serve_req_s']:.2f}x | | | | |")
    lines += ["", "req/s of each round (serve / Triton HTTP / Triton gRPC), the spread the load causes:", ""]
    for row in r["rows"]:
        spread = " / ".join(", ".join(f"{v:.1f}" for v in row[p]["rounds_requests_per_s"])
                            for p in ("serve", "triton_http", "triton_grpc"))
        lines.append(f"- {row['clients']} clients: {spread}")
    return "\n".join(lines) + "\n"


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    """Command line of the study."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--category", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--name", default="triton_lite")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    from o2n_edge.data import load_dataset

    why = unavailable()
    if why:
        p.error(f"the real tritonserver cannot run here: {why}")
    set_threads(a.threads)
    ds = load_dataset(a.data, None, a.category)
    jpegs = [s.path.read_bytes() for s in ds.test]
    site = os.environ.get(SITE_ENV)  # the models' numpy < 2 site folder, when one was given
    doc = {"name": a.name, "machine": machine_stamp(a.threads), "uptime_start": _uptime(),
           "note": " ".join(__doc__.split("Usage:")[0].split()),
           "command": (f"{SITE_ENV}={site} " if site else "") + "python -m benchmarks.triton_load " + " ".join(
               f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if k != "out")}
    doc["result"] = bench_triton(a.bundle, a.threads, jpegs, max_batch=a.max_batch)
    doc["uptime_end"] = _uptime()
    doc["machine"]["load_average_end"] = load_average()
    write_result(a.out, a.name, doc, triton_markdown(doc))
    print(triton_markdown(doc))


if __name__ == "__main__":
    main()
