"""The job queue edge: the in-memory twin and Redis Streams behave alike; Redis re-delivers."""

from __future__ import annotations

import time
import uuid

import pytest

from service.jobs.queues import MemoryQueue, RedisQueue


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
    tag, _job = dead.get(timeout=1)  # taken, never acknowledged: the worker died
    other = RedisQueue(redis_url, stream=stream, consumer="alive", idle_ms=0)
    tag2, job2 = other.get(timeout=1)
    assert (tag2, job2) == (tag, "job_x")
    other.ack(tag2)
    assert other.get(timeout=0.05) is None
    other.r.delete(stream)


@pytest.mark.redis
def test_redis_keeps_a_job_its_holder_touches(redis_url: str) -> None:
    """A long job stays with the live worker that touches it; only a silent holder loses it."""
    stream = f"zoo:test:{uuid.uuid4().hex}"
    holder = RedisQueue(redis_url, stream=stream, consumer="holder", idle_ms=300)
    other = RedisQueue(redis_url, stream=stream, consumer="other", idle_ms=300)
    holder.put("job_long")
    tag, _ = holder.get(timeout=1)
    for _ in range(6):  # 0.6 s of work, twice the idle limit, touched every 0.1 s
        time.sleep(0.1)
        holder.touch(tag)
        assert other.get(timeout=0.01) is None
    time.sleep(0.4)  # the holder goes silent past idle_ms: the job is taken over
    assert other.get(timeout=0.01) == (tag, "job_long")
    other.r.delete(stream)


def test_runner_touches_while_a_job_runs() -> None:
    """The job runner renews its claim every heartbeat_s until the job ends, then acknowledges."""
    import threading

    from service.jobs.runner import JobRunner

    class Recorder(MemoryQueue):
        heartbeat_s = 0.02

        def __init__(self) -> None:
            super().__init__()
            self.touched: list[str] = []

        def touch(self, tag: str) -> None:
            self.touched.append(tag)

    q = Recorder()
    runner = JobRunner.__new__(JobRunner)
    runner.queue = q
    done = threading.Event()
    beat = threading.Thread(target=runner._heartbeat, args=("7", done))
    beat.start()
    time.sleep(0.2)
    done.set()
    beat.join(timeout=1)
    assert not beat.is_alive()
    assert len(q.touched) >= 5 and set(q.touched) == {"7"}
