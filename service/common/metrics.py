"""Prometheus metrics, one registry per app (so several apps can live in one test process)."""

from __future__ import annotations

import os
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("zoo_http_requests", "HTTP requests", ["method", "route", "status"], registry=r)
        self.latency = Histogram("zoo_http_request_seconds", "HTTP request latency", ["route"], registry=r)
        self.cache_hits = Counter("zoo_path_cache_hits", "Predicts served by a cached materialized path", registry=r)
        self.cache_misses = Counter("zoo_path_cache_misses", "Predicts that had to materialize a path", registry=r)
        self.materializations = Counter("zoo_materializations", "Paths materialized", ["method"], registry=r)
        self.cache_bytes = Gauge("zoo_path_cache_bytes", "Bytes held by materialized paths", registry=r)
        self.batch_size = Histogram(
            "zoo_batch_size", "Inputs per forward pass", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r
        )
        self.paths_per_batch = Histogram(
            "zoo_paths_per_batch",
            "Distinct paths in one forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.slots_in_use = Gauge(
            "zoo_path_slots_in_use", "Path slots holding a path", ["bank"], multiprocess_mode="livesum", registry=r
        )
        self.slot_loads = Counter("zoo_path_slot_loads", "Paths copied into a slot", ["bank"], registry=r)
        self.slot_evictions = Counter(
            "zoo_path_slot_evictions", "Paths evicted from a slot for another", ["bank"], registry=r
        )
        self.host_bytes = Gauge(
            "zoo_path_host_bytes",
            "Bytes of decoded path tensors in the host tier",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.overloaded = Counter(
            "zoo_predicts_refused_overloaded", "Predicts refused with 503: the queue was full", registry=r
        )
        self.queue_inputs = Gauge(
            "zoo_batch_queue_inputs", "Inputs waiting for a batch", multiprocess_mode="livesum", registry=r
        )
        self.jobs = Counter("zoo_jobs", "Composition jobs by final state", ["state"], registry=r)


def render_metrics(metrics: Metrics) -> Response:
    """The exposition of ``metrics``, or, under `zoo serve` (PROMETHEUS_MULTIPROC_DIR set), of every
    process's metrics together."""
    registry = metrics.registry
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


class RequestMetrics:
    """Counts and times every HTTP request by route template, as a pure ASGI middleware (no task
    per request, unlike ``@app.middleware``). Requests carrying ``skip_header`` are not counted
    (the HTTP worker that passed them on counted them already); the catch-all pass-through route
    is named ``passthrough``."""

    def __init__(self, app: ASGIApp, metrics: Metrics, skip_header: str | None = None):
        self.app, self.metrics = app, metrics
        self.skip = skip_header.encode() if skip_header else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (self.skip and any(k == self.skip for k, _ in scope["headers"])):
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            name = getattr(scope.get("route"), "path", "unmatched")
            name = "passthrough" if name == "/{rest:path}" else name
            self.metrics.requests.labels(scope["method"], name, str(status)).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - start)
