"""The job runner without the app: what ``run_job`` stores."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.common.metrics import Metrics
from service.jobs.queues import MemoryQueue
from service.jobs.runner import JobRunner, run_job
from tests.conftest import tiny_card, tiny_weights
from tests.helpers import reprogram_spec
from zoo_store.core import bundle as bundle_module
from zoo_store.core.settings import Settings
from zoo_store.store.blobs import DirBlobStore
from zoo_store.store.db import Database
from zoo_store.store.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    db = Database(f"sqlite:///{tmp_path / 'zoo.db'}")
    db.migrate()
    store = Store(db, DirBlobStore(tmp_path / "blobs"))
    store.ensure_builtin_datasets()
    store.add_base(tiny_card("res"), tiny_weights("resnet_s", 10))
    yield store
    db.dispose()


def test_run_job_hashes_and_encodes_the_bundle_once(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tensors are hashed once (for the manifest), not again by decoding the bytes just encoded;
    the stored bundle is a valid one, with the job's path id."""
    hashed = []
    digest = bundle_module.tensor_digest
    monkeypatch.setattr(bundle_module, "tensor_digest", lambda t: hashed.append(1) or digest(t))
    job = store.create_job(reprogram_spec())
    run_job(store, job.id, None, "cpu")
    done = store.job(job.id)
    assert done.state == "succeeded", done.error
    assert len(hashed) == 1
    monkeypatch.undo()
    data = store.path_bundle(done.path_id)
    assert bundle_module.decode_bundle(data).id == done.path_id and done.metrics["bytes"] == len(data)
    assert store.path(done.path_id).metrics == {k: v for k, v in done.metrics.items() if k != "bytes"}


def test_submit_stores_the_job_and_queues_it(store: Store, tmp_path: Path) -> None:
    queue = MemoryQueue()
    runner = JobRunner(Settings(data_dir=tmp_path), store, queue, Metrics())
    row = runner.submit(reprogram_spec(), "a")
    assert (store.job(row.id).state, store.job(row.id).tenant) == ("queued", "a")
    assert queue.get(timeout=1)[1] == row.id


# -- outages and stops (issue 33): the consumer never dies, nothing is acknowledged before its outcome


def _cut() -> Exception:
    from sqlalchemy.exc import OperationalError

    return OperationalError("UPDATE jobs", {}, Exception("server closed the connection unexpectedly"))


class Ledger(MemoryQueue):
    """A memory queue that records every acknowledgement with the job's state at that moment."""

    def __init__(self, store: Store) -> None:
        super().__init__()
        self.store, self.tags, self.acked, self.released = store, {}, [], []

    def get(self, timeout: float):
        got = super().get(timeout)
        if got:
            self.tags[got[0]] = got[1]
        return got

    def ack(self, tag: str) -> None:
        self.acked.append((self.tags[tag], self.store.job_state(self.tags[tag])))

    def release(self, tag: str, job_id: str) -> None:
        self.released.append(job_id)
        super().release(tag, job_id)


def _runner(store: Store, queue: MemoryQueue, tmp_path: Path, **kw) -> JobRunner:
    settings = Settings(data_dir=tmp_path, job_executor="thread", device="cpu", **kw)
    runner = JobRunner(settings, store, queue, Metrics())
    runner.start()
    return runner


def _until(check, timeout: float = 60) -> None:
    import time

    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_the_consumer_outlives_a_queue_outage(store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Redis away for a while: the consumer waits with backoff (one warning, one when it heals), then runs jobs."""
    import redis

    class Flaky(Ledger):
        failures = 6

        def get(self, timeout: float):
            if self.failures:
                self.failures -= 1
                raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
            return super().get(timeout)

    queue = Flaky(store)
    runner = _runner(store, queue, tmp_path)
    try:
        job = runner.submit(reprogram_spec())
        _until(lambda: queue.acked)  # the ack follows the committed outcome: waiting on the state alone races it
        assert store.job_state(job.id) == "succeeded"
        assert all(t.is_alive() for t in runner._threads)
        assert queue.acked == [(job.id, "succeeded")]
    finally:
        runner.stop()
    said = [r.getMessage() for r in caplog.records if r.name == "zoo.jobs"]
    assert sum("queue is unreachable" in m for m in said) == 1, said
    assert sum("queue answers again" in m for m in said) == 1, said


def test_a_run_an_outage_cut_short_runs_again(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The database drops the connection under a job's progress report: the job is not failed for it
    but run again, and acknowledged once, after its success is committed."""
    cuts = []
    update = store.update_job

    def cut_once(job_id: str, **fields) -> None:
        if "progress" in fields and "state" not in fields and not cuts:
            cuts.append(job_id)
            raise _cut()
        update(job_id, **fields)

    monkeypatch.setattr(store, "update_job", cut_once)
    queue = Ledger(store)
    runner = _runner(store, queue, tmp_path)
    try:
        job = runner.submit(reprogram_spec())
        _until(lambda: queue.acked)
        assert cuts == [job.id]
        done = store.job(job.id)
        assert done.state == "succeeded" and done.error is None, done.error
        assert queue.acked == [(job.id, "succeeded")]
    finally:
        runner.stop()


def test_runs_cut_short_every_time_fail_with_the_reason(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    update = store.update_job
    runs = []

    def always_cut(job_id: str, **fields) -> None:
        if "progress" in fields and "state" not in fields:
            runs.append(job_id)
            raise _cut()
        update(job_id, **fields)

    monkeypatch.setattr(store, "update_job", always_cut)
    queue = Ledger(store)
    runner = _runner(store, queue, tmp_path, job_attempts=2)
    try:
        job = runner.submit(reprogram_spec())
        _until(lambda: queue.acked)
        done = store.job(job.id)
        assert done.state == "failed" and len(runs) == 2, (done.state, runs)
        assert "database went away while it ran" in done.error and "gave up after 2 attempt(s)" in done.error
        assert queue.acked == [(job.id, "failed")]
    finally:
        runner.stop()


def test_no_ack_before_the_outcome_is_committed(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The commit of a job's success fails: the entry is not acknowledged; the run goes again and the
    job ends succeeded with one path. A delivery of a job that already ended is only acknowledged."""
    finish, commits = store.finish_job, []

    def first_commit_lost(job_id: str, bundle, metrics) -> None:
        commits.append(job_id)
        if len(commits) == 1:
            raise _cut()
        finish(job_id, bundle, metrics)

    monkeypatch.setattr(store, "finish_job", first_commit_lost)
    queue = Ledger(store)
    runner = _runner(store, queue, tmp_path)
    try:
        job = runner.submit(reprogram_spec())
        _until(lambda: queue.acked)
        assert len(commits) == 2 and queue.acked == [(job.id, "succeeded")]
        queue.put(job.id)  # delivered again (a worker that died before its ack): nothing runs
        _until(lambda: len(queue.acked) == 2)
        assert len(commits) == 2 and queue.acked[1] == (job.id, "succeeded")
        assert len(store.list_paths(None, 10)[0]) == 1
    finally:
        runner.stop()


def test_stop_hands_a_running_job_back_or_lets_it_finish(store: Store, tmp_path: Path) -> None:
    """``stop(grace)``: a job that ends within the grace is finished and acknowledged; one that does
    not is handed back: marked queued (not failed), its entry back on the queue, no acknowledgement."""
    queue = Ledger(store)
    runner = _runner(store, queue, tmp_path)
    job = runner.submit(reprogram_spec())
    _until(lambda: store.job_state(job.id) == "running")
    runner.stop(grace=120)
    assert store.job_state(job.id) == "succeeded" and queue.acked == [(job.id, "succeeded")]

    queue = Ledger(store)
    runner = _runner(store, queue, tmp_path)
    long = runner.submit(reprogram_spec(task={"dataset": "digits"}, epochs=50))
    _until(lambda: (store.job(long.id).progress or {}).get("epoch", 0) >= 1)
    runner.stop(grace=0.1)
    assert store.job_state(long.id) == "queued" and store.job(long.id).progress == {"fraction": 0.0}
    assert queue.released == [long.id] and queue.acked == []
    assert queue.get(timeout=1)[1] == long.id  # for the next runner to take


def test_a_compose_with_the_queue_away_is_refused_and_keeps_nothing(store: Store, tmp_path: Path) -> None:
    """Redis down: submit is Unavailable (503) with Retry-After, and no job row is left to count
    against the tenant's quota or to stay queued forever."""
    from bench.scale import free_port
    from service.jobs.queues import RedisQueue
    from zoo_store.core.errors import Unavailable

    runner = JobRunner(Settings(data_dir=tmp_path), store, RedisQueue(f"redis://127.0.0.1:{free_port()}/0"), Metrics())
    with pytest.raises(Unavailable) as refused:
        runner.submit(reprogram_spec(), "a")
    assert refused.value.status == 503 and refused.value.headers() == {"Retry-After": "5"}
    assert store.list_jobs(None, 10)[0] == [] and store.usage("a")["jobs"] == 0


def test_a_queue_lost_between_the_check_and_the_put_leaves_no_row(store: Store, tmp_path: Path) -> None:
    import redis

    from zoo_store.core.errors import Unavailable

    class GoneAtPut(MemoryQueue):
        def put(self, job_id: str) -> None:
            raise redis.ConnectionError("Connection closed by server.")

    runner = JobRunner(Settings(data_dir=tmp_path), store, GoneAtPut(), Metrics())
    with pytest.raises(Unavailable):
        runner.submit(reprogram_spec(), "a")
    assert store.list_jobs(None, 10)[0] == []


@pytest.mark.redis
def test_jobs_whose_entries_redis_lost_are_sent_again(store: Store, tmp_path: Path, redis_url: str) -> None:
    """The jobs the database has queued but the stream has not (Redis restarted empty) are put on it
    again by the consumer that finds the marker gone; a job still on the stream is not put twice."""
    import uuid

    from service.jobs.queues import RedisQueue

    stream = f"zoo:test:{uuid.uuid4().hex}"
    queue = RedisQueue(redis_url, stream=stream)
    jobs = [store.create_job(reprogram_spec(seed=i)).id for i in range(2)]  # queued; entries lost
    queue.put(jobs[0])
    runner = _runner(store, queue, tmp_path)
    try:
        _until(lambda: all(store.job_state(j) == "succeeded" for j in jobs))
        assert sorted(f["job"] for _, f in queue.r.xrange(stream)) == sorted(jobs)
    finally:
        runner.stop()
        queue.r.delete(stream, f"{stream}:epoch")
