"""The job queue edge: one interface, an in-memory twin, and Redis Streams with a consumer group."""

from __future__ import annotations

import os
import queue
import socket
from typing import Protocol

from zoo_store.core.settings import Settings


class JobQueue(Protocol):
    heartbeat_s: float  # how often a worker holding a job must ``touch`` it
    def put(self, job_id: str) -> None: ...
    def get(self, timeout: float) -> tuple[str, str] | None: ...  # (delivery tag, job id)
    def ack(self, tag: str) -> None: ...
    def touch(self, tag: str) -> None: ...  # "still working on it": a live holder keeps its job


class MemoryQueue:
    heartbeat_s = 60.0

    def __init__(self) -> None:
        self.q: queue.Queue[str] = queue.Queue()
        self._n = 0

    def put(self, job_id: str) -> None:
        self.q.put(job_id)

    def get(self, timeout: float) -> tuple[str, str] | None:
        try:
            job_id = self.q.get(timeout=timeout)
        except queue.Empty:
            return None
        self._n += 1
        return str(self._n), job_id

    def ack(self, tag: str) -> None:
        pass  # one process: a job taken is never delivered again

    def touch(self, tag: str) -> None:
        pass  # one process: nobody else could take the job over


class RedisQueue:
    """Jobs on a Redis Stream read through a consumer group: acknowledged when done, and
    re-delivered to another consumer when a worker died holding them (XAUTOCLAIM after idle_ms).
    A live worker calls ``touch`` more often than that (the job runner does, every idle_ms / 4),
    so a long job is never taken from a worker that is still running it."""

    def __init__(self, url: str, stream: str = "zoo:jobs", group: str = "workers", consumer: str | None = None,
                 idle_ms: int = 60_000):  # fmt: skip
        import redis

        self.r = redis.Redis.from_url(url, decode_responses=True)
        self.stream, self.group, self.idle_ms = stream, group, idle_ms
        self.heartbeat_s = idle_ms / 4000
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        try:
            self.r.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def put(self, job_id: str) -> None:
        self.r.xadd(self.stream, {"job": job_id})

    def get(self, timeout: float) -> tuple[str, str] | None:
        _next, claimed, *_ = self.r.xautoclaim(
            self.stream, self.group, self.consumer, min_idle_time=self.idle_ms, start_id="0-0", count=1
        )
        if claimed:
            tag, fields = claimed[0]
            return tag, fields["job"]
        got = self.r.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=1, block=max(1, int(timeout * 1000)))
        if not got:
            return None
        tag, fields = got[0][1][0]
        return tag, fields["job"]

    def ack(self, tag: str) -> None:
        self.r.xack(self.stream, self.group, tag)

    def touch(self, tag: str) -> None:
        # XCLAIM to ourselves with min-idle 0 resets the entry's idle time (JUSTID: no re-delivery count)
        self.r.xclaim(self.stream, self.group, self.consumer, 0, [tag], justid=True)


def job_queue(settings: Settings) -> JobQueue:
    """The Settings' queue: the Redis stream in distributed mode, else one in this process's memory."""
    if settings.mode == "distributed":
        idle_ms = int(settings.job_claim_idle_s * 1000)
        return RedisQueue(settings.redis_url, stream=settings.jobs_stream, idle_ms=idle_ms)
    return MemoryQueue()
