"""The job queue edge: one interface, an in-memory twin, and Redis Streams with a consumer group."""

from __future__ import annotations

import logging
import os
import queue
import socket
import time
import uuid
from collections.abc import Callable
from typing import Protocol

from zoo_store.core.settings import Settings

log = logging.getLogger("zoo.jobs")

EPOCH_CHECK_S = 5.0  # how often a consumer looks whether Redis lost its data (and at once after an error)
EPOCH_TTL_S = 86_400  # the marker outlives every consumer by a day; one expired costs a look at the stream


class JobQueue(Protocol):
    heartbeat_s: float  # how often a worker holding a job must ``touch`` it

    def check(self) -> None: ...  # raises when the queue cannot take a job now (its server is away)
    def put(self, job_id: str) -> None: ...
    def get(self, timeout: float) -> tuple[str, str] | None: ...  # (delivery tag, job id)
    def ack(self, tag: str) -> None: ...
    def touch(self, tag: str) -> bool: ...  # "still working on it": a live holder keeps its job; False: it is gone
    def release(self, tag: str, job_id: str) -> None: ...  # hand a job taken back, for any worker to take now
    def job_ids(self) -> set[str]: ...  # the jobs whose entries the queue holds


class MemoryQueue:
    heartbeat_s = 60.0

    def __init__(self) -> None:
        self.q: queue.Queue[str] = queue.Queue()
        self._n = 0

    def check(self) -> None:
        pass  # in this process: always there

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

    def touch(self, tag: str) -> bool:
        return True  # one process: nobody else could take the job over

    def release(self, tag: str, job_id: str) -> None:
        self.q.put(job_id)

    def job_ids(self) -> set[str]:
        with self.q.mutex:
            return set(self.q.queue)


class RedisQueue:
    """Jobs on a Redis Stream read through a consumer group: acknowledged when done, and
    re-delivered to another consumer when a worker died holding them (XAUTOCLAIM after idle_ms).
    A live worker calls ``touch`` more often than that (the job runner does, every idle_ms / 4),
    so a long job is never taken from a worker that is still running it.

    A Redis that restarted empty (no persistence) has lost the stream, its group and its entries.
    Consumers keep a marker beside the stream (``<stream>:epoch``) and look at it every
    EPOCH_CHECK_S; the first to find it gone sets a new one and calls ``on_reset`` (the job runner
    sends the jobs still queued in the database again); ``get`` makes a group that is gone again."""

    def __init__(
        self,
        url: str,
        stream: str = "zoo:jobs",
        group: str = "workers",
        consumer: str | None = None,
        idle_ms: int = 60_000,
        on_reset: Callable[[], None] | None = None,
    ):
        import redis

        # bounded waits: a server that went away is an error in seconds, never a hang (reads block 1 s at most)
        self.r = redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=2, socket_timeout=10)
        self.stream, self.group, self.idle_ms = stream, group, idle_ms
        self.heartbeat_s = idle_ms / 4000
        # host, pid and a random part: containers on the host's network share its name and may share a pid
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.on_reset = on_reset
        self._epoch: str | None = None  # the marker this consumer saw last
        self._next_look = 0.0
        try:
            self._make_group()
        except redis.ConnectionError:  # Redis away at start: the first ``get`` that reaches it makes the group
            log.warning("jobs: Redis unreachable at %s; the consumer group is made when it answers", url)

    def _make_group(self) -> None:
        import redis

        try:
            self.r.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def _look_for_a_reset(self) -> None:
        """Every EPOCH_CHECK_S: a marker gone means Redis lost its data since the last look (or none
        was ever set); the consumer that sets the new one first calls ``on_reset``, once."""
        if time.monotonic() < self._next_look:
            return
        key = f"{self.stream}:epoch"
        seen = self.r.getex(key, ex=EPOCH_TTL_S)
        if seen is None:
            mine = uuid.uuid4().hex
            if self.r.set(key, mine, nx=True, ex=EPOCH_TTL_S):
                if self._epoch is not None:
                    log.warning("jobs: Redis lost the job stream %s (restarted empty?)", self.stream)
                self._epoch = mine
                self._make_group()
                if self.on_reset is not None:
                    self.on_reset()
            else:  # another consumer saw it first
                self._epoch = self.r.get(key)
        else:
            self._epoch = seen
        self._next_look = time.monotonic() + EPOCH_CHECK_S

    def check(self) -> None:
        self.r.ping()

    def put(self, job_id: str) -> None:
        self.r.xadd(self.stream, {"job": job_id})

    def get(self, timeout: float) -> tuple[str, str] | None:
        import redis

        try:
            self._look_for_a_reset()
            return self._get(timeout)
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            self._make_group()
            self._next_look = 0.0  # at once: Redis may have lost everything
            return None
        except redis.ConnectionError:
            self._next_look = 0.0
            raise

    def _get(self, timeout: float) -> tuple[str, str] | None:
        _next, claimed, *_ = self.r.xautoclaim(
            self.stream, self.group, self.consumer, min_idle_time=self.idle_ms, start_id="0-0", count=1
        )
        if claimed:
            tag, fields = claimed[0]
            return tag, fields["job"]
        block = max(1, min(1000, int(timeout * 1000)))
        got = self.r.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=1, block=block)
        if not got:
            return None
        tag, fields = got[0][1][0]
        return tag, fields["job"]

    def ack(self, tag: str) -> None:
        self.r.xack(self.stream, self.group, tag)

    def touch(self, tag: str) -> bool:
        # XCLAIM to ourselves with min-idle 0 resets the entry's idle time (JUSTID: no re-delivery count);
        # nothing claimed: the entry is gone (acknowledged elsewhere, or lost with Redis's data)
        return self._claim(tag) != []

    def release(self, tag: str, job_id: str) -> None:
        """Make the entry look idle for longer than idle_ms, so that the next worker to look takes it
        over at once; an entry that is gone (Redis lost it) is added again."""
        if self._claim(tag, idle=self.idle_ms + 1000) == []:
            self.put(job_id)

    def _claim(self, tag: str, idle: int | None = None) -> list:
        import redis

        try:
            return self.r.xclaim(self.stream, self.group, self.consumer, 0, [tag], justid=True, idle=idle)
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            return []

    def job_ids(self) -> set[str]:
        return {fields.get("job", "") for _, fields in self.r.xrange(self.stream)}


def job_queue(settings: Settings) -> JobQueue:
    """The Settings' queue: the Redis stream in distributed mode, else one in this process's memory."""
    if settings.mode == "distributed":
        idle_ms = int(settings.job_claim_idle_s * 1000)
        return RedisQueue(settings.redis_url, stream=settings.jobs_stream, idle_ms=idle_ms)
    return MemoryQueue()
