"""Composition jobs: run outside the request path, persist state and progress, can be cancelled."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import traceback
from collections.abc import Callable
from typing import Any

from service.common.metrics import Metrics
from service.jobs.queues import JobQueue, job_queue
from zoo_store.archs import TapNet
from zoo_store.core.bundle import Bundle, encode_bundle, make_manifest, path_id_of
from zoo_store.core.cards import Card
from zoo_store.core.device import configure_torch, torch_device
from zoo_store.core.errors import NotFound
from zoo_store.core.settings import Settings
from zoo_store.core.spec import CompositionSpec, TaskSpec
from zoo_store.datasets.tasks import TaskData, make_task
from zoo_store.methods import get_method
from zoo_store.methods.base import BuildContext, Cancelled
from zoo_store.store.db import Database, JobRow
from zoo_store.store.store import TERMINAL, Store

log = logging.getLogger("zoo.jobs")


def run_job(store: Store, job_id: str, bases: dict[str, tuple[Card, TapNet]] | None, device: str) -> None:
    """Build one job's path and store it with the job's success in one transaction. A job cancelled
    or deleted meanwhile stops at its next step and stores nothing."""
    try:
        job = store.job(job_id)
    except NotFound:  # deleted before it ran
        return
    if job.state in TERMINAL:
        return
    spec = CompositionSpec.model_validate(job.spec)
    method = get_method(spec.method)
    store.update_job(job_id, state="running", progress={"fraction": 0.0})
    try:
        needed = method.check(spec, store.cards())
        if bases is None:
            bases = {k: (store.card(k), store.load_base(store.card(k), device)) for k in needed}

        def load_task(task: TaskSpec, card: Card) -> TaskData:
            return make_task(store.arrays(task.dataset), task, card.input, spec.train.seed)

        def report(**info: Any) -> None:
            store.update_job(job_id, progress={k: v for k, v in info.items() if v is not None})

        def cancelled() -> bool:
            try:
                j = store.job(job_id)
            except NotFound:  # deleted
                return True
            return j.cancel_requested or j.state == "cancelled"

        ctx = BuildContext(bases=bases, load_task=load_task, device=device, report=report, cancelled=cancelled,
                           cache=store.cache)
        art = method.build(spec, ctx)
        manifest = make_manifest(art)  # the tensors hashed once, here; encoded once, below
        data = encode_bundle(manifest, art.tensors, art.metrics)
        bundle = Bundle(path_id_of(manifest), manifest, art.tensors, art.metrics, data)
        store.finish_job(job_id, bundle, {**art.metrics, "bytes": len(data)})
    except Cancelled:
        store.cancel_job(job_id)
    except Exception as e:
        log.exception("job %s failed", job_id)
        store.update_job(job_id, state="failed", error=f"{type(e).__name__}: {e}", progress={"trace": traceback.format_exc()[-2000:]})


def _child_main(settings_json: str, job_id: str, parent: int) -> None:
    from service.common.procs import die_with_parent

    die_with_parent(parent)  # a job never outlives the process that runs the zoo
    settings = Settings.model_validate_json(settings_json)
    device = configure_torch(settings)
    db = Database(settings.db_url)
    try:
        run_job(Store.open(settings, db), job_id, None, device)
    finally:
        db.dispose()


class JobRunner:
    """Consumes the queue on background threads; each job in a child process (or a thread in tests)."""

    def __init__(self, settings: Settings, store: Store, queue: JobQueue, metrics: Metrics,
                 resident: Callable[[], dict[str, tuple[Card, TapNet]]] | None = None):  # fmt: skip
        self.settings, self.store, self.queue, self.metrics = settings, store, queue, metrics
        self.resident = resident
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.procs: dict[str, mp.Process] = {}

    @classmethod
    def open(cls, settings: Settings) -> JobRunner:
        """A runner and only what it needs: the Settings' database, store and queue (``zoo worker``)."""
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        return cls(settings, Store.open(settings, Database(settings.db_url)), job_queue(settings), Metrics())

    def submit(self, spec: dict[str, Any], tenant: str | None = None) -> JobRow:
        """A new job for the spec (checked by the caller), queued for whichever runner takes it first."""
        row = self.store.create_job(spec, tenant)
        self.queue.put(row.id)
        return row

    def recover(self) -> None:
        """A job left running by a dead server is failed; queued ones go back on the queue."""
        for job_id in self.store.fail_stale_jobs("the server stopped while this job ran; submit it again"):
            self.queue.put(job_id)

    def start(self) -> None:
        for i in range(self.settings.job_workers):
            t = threading.Thread(target=self._loop, name=f"zoo-jobs-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for p in list(self.procs.values()):
            p.terminate()
        for t in self._threads:
            t.join(timeout=5)

    def cancel(self, job_id: str) -> None:
        """A queued job stops at once; a running one at its next step (its process here: at once)."""
        self.store.cancel_job(job_id)
        proc = self.procs.get(job_id)
        if proc is not None and proc.is_alive():
            proc.terminate()

    def delete(self, job_id: str) -> None:
        """Cancel the job, then delete it; the path it made, if any, stays."""
        self.cancel(job_id)
        self.store.delete_job(job_id)

    def _loop(self) -> None:
        while not self._stop.is_set():
            got = self.queue.get(timeout=0.2)
            if got is None:
                continue
            tag, job_id = got
            done = threading.Event()
            beat = threading.Thread(target=self._heartbeat, args=(tag, done), daemon=True)
            beat.start()
            try:
                self._execute(job_id)
            finally:
                done.set()
                beat.join()
                self.queue.ack(tag)
                state = self.store.job_state(job_id) or "cancelled"  # deleted: it was cancelled first
                self.metrics.jobs.labels(state).inc()

    def _heartbeat(self, tag: str, done: threading.Event) -> None:
        """Keep the job ours on the queue while it runs, however long it takes."""
        while not done.wait(self.queue.heartbeat_s):
            try:
                self.queue.touch(tag)
            except Exception:
                log.warning("could not renew the claim on %s", tag, exc_info=True)

    def _execute(self, job_id: str) -> None:
        if self.settings.job_executor == "thread":
            run_job(self.store, job_id, self.resident() if self.resident else None, torch_device(self.settings))
            return
        ctx = mp.get_context("spawn")
        proc = ctx.Process(target=_child_main, args=(self.settings.model_dump_json(), job_id, os.getpid()), daemon=True)
        self.procs[job_id] = proc
        proc.start()
        while proc.is_alive() and not self._stop.is_set():
            proc.join(timeout=0.2)
        self.procs.pop(job_id, None)
        if proc.exitcode not in (0, None):  # (a job that ended, or is gone, is not changed)
            self.store.update_job(job_id, state="failed", error=f"job process exited with code {proc.exitcode}")
