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
def test_redis_consumers_are_named_apart_on_one_host_and_pid(redis_url: str) -> None:
    """Workers in containers on the host's network share its host name and may share a pid (1): a
    consumer name of host and pid alone would make two workers one consumer."""
    stream = f"zoo:test:{uuid.uuid4().hex}"
    a, b = RedisQueue(redis_url, stream=stream), RedisQueue(redis_url, stream=stream)
    assert a.consumer != b.consumer and a.consumer.rsplit("-", 2)[1] == b.consumer.rsplit("-", 2)[1]
    a.r.delete(stream)


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


def test_runner_touches_while_a_job_runs(tmp_path) -> None:
    """The job runner renews its claim every heartbeat_s until the job ends, then acknowledges."""
    import threading

    from service.jobs.runner import JobRunner, _Delivery
    from zoo_store.core.settings import Settings

    class Recorder(MemoryQueue):
        heartbeat_s = 0.02

        def __init__(self) -> None:
            super().__init__()
            self.touched: list[str] = []

        def touch(self, tag: str) -> bool:
            self.touched.append(tag)
            return True

    q = Recorder()
    runner = JobRunner(Settings(data_dir=tmp_path), None, q, None)  # the heartbeat needs only the queue
    done = threading.Event()
    beat = threading.Thread(target=runner._heartbeat, args=(_Delivery("7", "job_7"), done))
    beat.start()
    time.sleep(0.2)
    done.set()
    beat.join(timeout=1)
    assert not beat.is_alive()
    assert len(q.touched) >= 5 and set(q.touched) == {"7"}


@pytest.mark.redis
def test_redis_makes_its_group_again_when_the_stream_is_lost(redis_url: str) -> None:
    """Redis restarted empty: the stream, its group and the marker beside it are gone. The next
    ``get`` makes the group again, and of two consumers exactly one calls ``on_reset``; an entry held
    is gone (``touch`` says so) and handing it back adds it again."""
    stream = f"zoo:test:{uuid.uuid4().hex}"
    resets: list[str] = []
    a = RedisQueue(redis_url, stream=stream, consumer="a", on_reset=lambda: resets.append("a"))
    b = RedisQueue(redis_url, stream=stream, consumer="b", on_reset=lambda: resets.append("b"))
    a.put("job_held")
    tag, _ = a.get(timeout=1)
    assert b.get(timeout=0.05) is None and resets == ["a"]  # the first look: no marker yet, a set it
    assert a.touch(tag)
    a.r.delete(stream, f"{stream}:epoch")  # what a restart without persistence does
    assert not a.touch(tag)
    for _ in range(2):
        assert a.get(timeout=0.05) is None and b.get(timeout=0.05) is None
    assert sorted(resets) in (["a", "a"], ["a", "b"])  # one more, from whichever looked first
    a.release(tag, "job_held")
    a.put("job_new")
    assert [a.get(timeout=1)[1] for _ in range(2)] == ["job_held", "job_new"]
    assert a.job_ids() == {"job_held", "job_new"}
    a.r.delete(stream, f"{stream}:epoch")


@pytest.mark.redis
def test_redis_release_hands_an_entry_to_another_consumer_at_once(redis_url: str) -> None:
    stream = f"zoo:test:{uuid.uuid4().hex}"
    holder = RedisQueue(redis_url, stream=stream, consumer="holder", idle_ms=60_000)
    other = RedisQueue(redis_url, stream=stream, consumer="other", idle_ms=60_000)
    holder.put("job_x")
    tag, _ = holder.get(timeout=1)
    assert other.get(timeout=0.05) is None  # held, and far from idle_ms
    holder.release(tag, "job_x")
    assert other.get(timeout=0.05) == (tag, "job_x")  # the same entry, now the other's
    other.r.delete(stream)


def test_redis_away_is_an_error_in_seconds_never_a_hang() -> None:
    """A queue whose Redis is not there: made all the same (its group later); each call fails fast."""
    import redis

    from bench.scale import free_port

    q = RedisQueue(f"redis://127.0.0.1:{free_port()}/0", stream="zoo:test:away")
    start = time.monotonic()
    for call in (q.check, lambda: q.put("job_a"), lambda: q.get(timeout=0.2)):
        with pytest.raises(redis.ConnectionError):
            call()
    assert time.monotonic() - start < 30
