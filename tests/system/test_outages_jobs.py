"""What an outage does to composition jobs (issue 33), on a PostgreSQL and a Redis of each test's
own (tests/system/outages.py) under real ``zoo worker`` processes (and a ``zoo serve`` replica):
Redis restarted empty under a running worker, PostgreSQL stopped while a job runs, a compose while
Redis is down, SIGTERM to a worker in the middle of a job. Each test prints what it measured
(``pytest -s``); docs/deploy.md ("What an outage does to jobs") quotes the figures."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from bench.cluster import Cluster, Proc
from service.jobs.queues import RedisQueue
from tests.conftest import tiny_card, tiny_weights
from tests.helpers import reprogram_spec
from tests.system.outages import PrivatePostgres, PrivateRedis
from zoo_store.store.blobs import DbBlobStore
from zoo_store.store.db import Database, JobRow
from zoo_store.store.store import TERMINAL, Store

THREADS = {"ZOO_JOB_EXECUTOR": "thread"}  # jobs on the worker's thread, its bases resident: no process to start
LARGER = {"dataset": "digits", "labels": ["0", "1", "2"], "samples_per_label": 64}  # 8x the helpers' small task


@dataclass
class Rig:
    """A private PostgreSQL and Redis, the zoo's schema and one tiny base in it, and a cluster of
    processes on them; jobs are submitted as a replica does (a row, then an entry on the stream)."""

    pg: PrivatePostgres
    redis: PrivateRedis
    cluster: Cluster
    db: Database
    store: Store

    def queue(self) -> RedisQueue:
        return RedisQueue(self.redis.url, stream=self.cluster.stream)

    def submit(self, epochs: int = 1, task: dict | None = None) -> str:
        job = self.store.create_job(reprogram_spec(epochs=epochs, task=task))
        q = self.queue()
        q.put(job.id)
        q.r.close()
        return job.id

    def state(self, job_id: str) -> JobRow:
        return self.store.job(job_id)

    def wait(self, job_id: str, until: tuple[str, ...] = TERMINAL, timeout: float = 60, epoch: int = 0) -> JobRow:
        """The job once in a state of ``until`` (and, running, at ``epoch`` or later); the database may be away."""
        end = time.monotonic() + timeout
        while True:
            with contextlib.suppress(Exception):
                job = self.state(job_id)
                if job.state in TERMINAL or (job.state in until and job.progress.get("epoch", 0) >= epoch):
                    return job
            if time.monotonic() > end:
                raise TimeoutError(f"job {job_id} not {until} after {timeout} s: {self.logs()}")
            time.sleep(0.05)

    def states(self) -> dict[str, int]:
        with self.db.session() as s:
            return dict(s.execute(select(JobRow.state, func.count()).group_by(JobRow.state)).all())

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.tail()}" for p in self.cluster.procs.values())


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    pg, redis = PrivatePostgres(), PrivateRedis()
    db = Database(pg.url)
    cluster = Cluster(tmp_path, pg.url, redis.url)
    try:
        db.migrate()
        store = Store(db, DbBlobStore(db))
        store.ensure_builtin_datasets()
        store.add_base(tiny_card("res"), tiny_weights("resnet_s", 10))
        yield Rig(pg, redis, cluster, db, store)
    finally:
        for p in cluster.procs.values():
            p.kill() if p.alive() else None
        db.dispose()
        redis.close()
        pg.close()


def said(proc: Proc, pattern: str) -> int:
    """How many lines of the process's log match."""
    return len(re.findall(pattern, proc.log.read_text(errors="replace")))


def report(name: str, figures: dict) -> None:
    print(f"\noutage report {name}: {json.dumps(figures)}")


def test_redis_restarted_empty_under_a_running_worker(rig: Rig) -> None:
    """Redis stops (its stream, group and entries lost: no persistence) while a worker runs a job and
    two more wait on the stream, and starts again. The running job goes on through the outage (it is
    then cancelled, as a user would, to keep the test short: its end is acknowledged like any other);
    the two waiting are sent again from the database; a job submitted afterwards runs; the worker
    logs one line when Redis goes and one when it is back."""
    worker = rig.cluster.worker("worker0", **THREADS)
    rig.cluster.wait_ready(timeout=60)
    running = rig.submit(epochs=200, task=LARGER)  # far longer than the test: running across the restart
    waiting = [rig.submit(), rig.submit()]
    at_stop = rig.wait(running, until=("running",), epoch=1).progress["epoch"]
    stopped = time.monotonic()
    rig.redis.stop()
    time.sleep(2)
    rig.redis.start()
    back = time.monotonic()
    later = rig.submit()
    end = time.monotonic() + 30
    while not said(worker, f"lost the entry of job {running}"):  # its heartbeat, renewing the claim, found it gone
        assert time.monotonic() < end, rig.logs()
        time.sleep(0.05)
    job = rig.state(running)
    assert job.state == "running" and job.progress["epoch"] > at_stop, (job.state, job.progress, rig.logs())
    rig.store.cancel_job(running)
    jobs = [rig.wait(j, timeout=60) for j in (running, *waiting, later)]
    recovered = time.monotonic() - back
    assert worker.alive(), rig.logs()
    assert [j.state for j in jobs] == ["cancelled"] + ["succeeded"] * 3, [(j.id, j.state, j.error) for j in jobs]
    down, up = said(worker, "jobs: the queue is unreachable"), said(worker, "jobs: the queue answers again")
    resent = re.findall(r"(\d+) job\(s\) queued in the database sent again", worker.log.read_text())
    assert (down, up) == (1, 1), rig.logs()
    assert resent and int(resent[-1]) == 2, rig.logs()  # the two it had not taken before the restart
    report(
        "redis_restart",
        {
            "jobs": len(jobs),
            "states": rig.states(),
            "redis_down_s": round(back - stopped, 1),
            "running_job_epochs_at_stop_and_after": [at_stop, job.progress["epoch"]],
            "all_ended_after_redis_back_s": round(recovered, 1),
            "resent_from_database": int(resent[-1]),
            "log_lines_down_up": [down, up],
        },
    )


def test_postgres_stopped_while_a_job_runs(rig: Rig) -> None:
    """PostgreSQL stops for a few seconds while a job runs in its job process (the default executor):
    the run cut short is run again once the database answers; the job ends succeeded (or failed
    with a reason), never running; a job submitted afterwards runs; the worker stays up."""
    worker = rig.cluster.worker("worker0")
    rig.cluster.wait_ready(timeout=60)
    job_id = rig.submit(epochs=12)
    rig.wait(job_id, until=("running",), epoch=1, timeout=90)
    stopped = time.monotonic()
    rig.pg.stop()
    time.sleep(3)
    rig.pg.start()
    back = time.monotonic()
    job = rig.wait(job_id, timeout=90)
    ended = time.monotonic() - back
    assert job.state == "succeeded" or (job.state == "failed" and job.error), (job.state, job.error, rig.logs())
    later = rig.wait(rig.submit(), timeout=90)
    assert later.state == "succeeded", (later.error, rig.logs())
    assert worker.alive(), rig.logs()
    attempts = said(worker, rf"job {job_id}, attempt \d+ of \d+, cut short")
    down, up = said(worker, "jobs: the database is unreachable"), said(worker, "jobs: the database answers again")
    assert attempts >= 1 and down == up == 1, rig.logs()
    report(
        "postgres_stop",
        {
            "jobs": 2,
            "states": rig.states(),
            "postgres_down_s": round(back - stopped, 1),
            "runs_cut_short": attempts,
            "first_job": job.state,
            "error": job.error,
            "first_job_ended_after_postgres_back_s": round(ended, 1),
            "log_lines_down_up": [down, up],
        },
    )


def test_a_compose_while_redis_is_down_is_refused_and_keeps_nothing(rig: Rig) -> None:
    """Through a replica (``zoo serve``): with Redis down a compose is 503 with Retry-After and writes
    no job row, so a tenant allowed one job at a time is refused again with 503, not 403; with Redis
    back its compose is accepted, and then its quota is full."""
    rig.cluster.replica("replica0", ZOO_TENANT_MAX_JOBS="1")
    rig.cluster.wait_ready(timeout=90)
    admin = rig.cluster.client("replica0")
    key = admin.create_key("acme")["key"]
    tenant = httpx.Client(
        base_url=rig.cluster.procs["replica0"].url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    spec = reprogram_spec()
    rig.redis.stop()
    refused = [tenant.post("/v1/compositions", json=spec) for _ in range(3)]
    rows_while_down = rig.states()
    usage = admin.http.get("/v1/tenants/acme").json()["usage"]["jobs"]
    rig.redis.start()
    accepted = tenant.post("/v1/compositions", json=spec)
    over = tenant.post("/v1/compositions", json=spec)
    tenant.close()
    assert [r.status_code for r in refused] == [503] * 3, [r.text for r in refused]
    assert all(r.headers.get("retry-after") == "5" for r in refused), [dict(r.headers) for r in refused]
    assert "not queued" in refused[0].json()["detail"]
    assert rows_while_down == {} and usage == 0
    assert accepted.status_code == 202, accepted.text
    assert over.status_code == 403 and "max_jobs" in over.json()["detail"], over.text
    queue = rig.queue()
    assert queue.job_ids() == {accepted.json()["id"]} and rig.states() == {"queued": 1}
    queue.r.close()
    report(
        "compose_redis_down",
        {
            "composes_while_down": len(refused),
            "answers": sorted({r.status_code for r in refused}),
            "job_rows_while_down": sum(rows_while_down.values()),
            "tenant_jobs_counted": usage,
            "after_redis_back": [accepted.status_code, over.status_code],
        },
    )


def test_sigterm_to_a_worker_in_the_middle_of_a_job(rig: Rig) -> None:
    """SIGTERM to a worker's process group (as a service manager sends it: its job process gets it
    too). A worker with no grace hands its job back (queued, its entry released): the other worker
    takes it over at once; SIGTERM to that one, whose grace covers the job, lets it finish the job,
    then it exits. Both exit 0; the job succeeds, nothing is failed or left running."""
    short = rig.cluster.worker("worker-short", ZOO_JOB_STOP_GRACE_S="0")
    long = rig.cluster.worker("worker-long", ZOO_JOB_STOP_GRACE_S="60")
    rig.cluster.wait_ready(timeout=90)
    long.send(signal.SIGSTOP)  # the job goes to `short`: `long` is not reading (its last blocking read ended)
    time.sleep(1.5)
    job_id = rig.submit(epochs=20)
    rig.wait(job_id, until=("running",), epoch=1, timeout=90)
    long.send(signal.SIGCONT)
    assert rig.cluster.holder_of(job_id) is short
    sent = time.monotonic()
    short.send(signal.SIGTERM)
    assert short.popen.wait(30) == 0, short.tail()
    short_exit = time.monotonic() - sent
    assert said(short, f"job {job_id} handed back") == 1, short.tail()
    rig.wait(job_id, until=("running",), epoch=1, timeout=60)
    assert rig.cluster.holder_of(job_id) is long
    taken = time.monotonic() - sent
    sent = time.monotonic()
    long.send(signal.SIGTERM)
    assert long.popen.wait(90) == 0, long.tail()
    long_exit = time.monotonic() - sent
    done = rig.state(job_id)
    assert done.state == "succeeded", (done.state, done.error, rig.logs())
    assert said(long, "handed back") == 0, long.tail()
    assert rig.states() == {"succeeded": 1}
    report(
        "sigterm",
        {
            "jobs": 1,
            "states": rig.states(),
            "no_grace_worker_exited_s": round(short_exit, 1),
            "taken_over_and_at_epoch_1_after_s": round(taken, 1),
            "grace_worker_finished_the_job_and_exited_s": round(long_exit, 1),
        },
    )
