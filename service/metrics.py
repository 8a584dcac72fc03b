"""Prometheus metrics, one registry per app (so several apps can live in one test process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


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
            "zoo_paths_per_batch", "Distinct paths in one forward pass", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r
        )
        self.slots_in_use = Gauge("zoo_path_slots_in_use", "Path slots holding a path", ["bank"], registry=r)
        self.slot_loads = Counter("zoo_path_slot_loads", "Paths copied into a slot", ["bank"], registry=r)
        self.slot_evictions = Counter("zoo_path_slot_evictions", "Paths evicted from a slot for another", ["bank"], registry=r)
        self.host_bytes = Gauge("zoo_path_host_bytes", "Bytes of decoded path tensors in the host tier", registry=r)
        self.overloaded = Counter("zoo_predicts_refused_overloaded", "Predicts refused with 503: the queue was full", registry=r)
        self.jobs = Counter("zoo_jobs", "Composition jobs by final state", ["state"], registry=r)
