"""The job queue edge: the in-memory twin and Redis Streams behave alike; Redis re-delivers."""

from __future__ import annotations

import uuid

import pytest

from service.queues import MemoryQueue, RedisQueue


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def queue(request):
    if request.param == "memory":
        return MemoryQueue()
    return RedisQueue(request.getfixturevalue("redis_url"), stream=f"zoo:test:{uuid.uuid4().hex}")


def test_put_get_ack(queue) -> None:
    assert queue.get(timeout=0.05) is None
    queue.put("job_a")
    queue.put("job_b")
    tag, job = queue.get(timeout=1)
    assert job == "job_a"
    queue.ack(tag)
    assert queue.get(timeout=1)[1] == "job_b"


@pytest.mark.redis
def test_redis_redelivers_unacked(redis_url: str) -> None:
    stream = f"zoo:test:{uuid.uuid4().hex}"
    dead = RedisQueue(redis_url, stream=stream, consumer="dead")
    dead.put("job_x")
    tag, job = dead.get(timeout=1)  # taken, never acknowledged: the worker died
    other = RedisQueue(redis_url, stream=stream, consumer="alive", idle_ms=0)
    tag2, job2 = other.get(timeout=1)
    assert (tag2, job2) == (tag, "job_x")
    other.ack(tag2)
    assert other.get(timeout=0.05) is None
    other.r.delete(stream)
