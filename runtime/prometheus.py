"""The server's Prometheus metrics, through ``prometheus_client`` (the ecosystem's own exposition).

Why a registry per app: tests and embedding code build many apps in one process, and each must
count only its own requests. The metric names are a contract with dashboards and alert rules
(``tests/test_server.py`` pins them): rename one only with a migration note in the README.

Runtime rule: nothing here may import torch.
"""

from __future__ import annotations

import time
from typing import Awaitable, Callable

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

# Latency histogram buckets (seconds), Prometheus' defaults stretched to slow CPU inference.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# The route whose latency the histogram holds.
INSPECT_ROUTE = "/v1/inspect"
# The text format every Prometheus (and most agents) scrape; the names are legacy-valid.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
DECISIONS = ("normal", "anomalous")


class ServerMetrics:
    """Every series behind /metrics, in this app's own registry.

    ``queue_depth`` is read at scrape time, so the gauge is never stale. prometheus_client's
    metrics are thread-safe, so the worker threads and the event loop may both update them.
    """

    def __init__(
        self, queue_depth: Callable[[], float], max_queue: int, bundle_hash: str, threshold: float
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "o2n_http_requests", "HTTP requests by route and status.", ["path", "status"], registry=r
        )
        self.latency = Histogram(
            "o2n_inspect_latency_seconds",
            "Server-side latency of POST /v1/inspect, every status.",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.decisions = Counter(
            "o2n_decisions", "Logged decisions by outcome.", ["decision"], registry=r
        )
        for outcome in DECISIONS:  # both series exist from the start, at 0
            self.decisions.labels(decision=outcome)
        self.rejected = Counter(
            "o2n_rejected", "Requests refused with 503 (queue full).", registry=r
        )
        depth = Gauge("o2n_queue_depth", "Inspect requests in flight or waiting.", registry=r)
        depth.set_function(queue_depth)
        Gauge(
            "o2n_queue_capacity", "max_queue: depth at which requests get 503.", registry=r
        ).set(max_queue)
        self.threshold = Gauge(
            "o2n_threshold", "Decision threshold of the loaded bundle.", registry=r
        )
        self.bundle = Info("o2n_bundle", "The loaded bundle (value is always 1).", registry=r)
        self.set_bundle(bundle_hash, threshold)
        self.reloads = Counter(
            "o2n_reloads", "Bundle reloads by outcome (ok or refused).", ["outcome"], registry=r
        )
        for outcome in ("ok", "refused"):
            self.reloads.labels(outcome=outcome)
        self.feedback_labels = Counter(
            "o2n_feedback", "Operator verdicts stored, by label.", ["label"], registry=r
        )
        for label in ("good", "defect"):
            self.feedback_labels.labels(label=label)
        self.keep_failures = Counter(
            "o2n_keep_failures",
            "Inspected images that could not be kept (full or unwritable directory).",
            registry=r,
        )

    def set_bundle(self, bundle_hash: str, threshold: float) -> None:
        """Name the bundle now serving (at start and after each reload)."""
        self.threshold.set(float(threshold))
        self.bundle.info({"bundle_hash": str(bundle_hash)})

    def reload(self, ok: bool) -> None:
        self.reloads.labels(outcome="ok" if ok else "refused").inc()

    def feedback(self, label: str) -> None:
        self.feedback_labels.labels(label=label).inc()

    def keep_failure(self) -> None:
        self.keep_failures.inc()

    def observe(self, path: str, status: int, seconds: float) -> None:
        """One finished HTTP request (``path`` is the matched route template: bounded labels)."""
        self.requests.labels(path=path, status=str(status)).inc()
        if path == INSPECT_ROUTE:
            self.latency.observe(seconds)

    def decision(self, anomalous: bool) -> None:
        self.decisions.labels(decision="anomalous" if anomalous else "normal").inc()

    def reject(self) -> None:
        self.rejected.inc()

    def render(self) -> bytes:
        """The exposition text (format 0.0.4)."""
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware: counts every HTTP request by matched route and final status."""

    def __init__(self, app: Callable[..., Awaitable[None]], metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"  # bounded label set
            self.metrics.observe(path, status[0], time.perf_counter() - start)
