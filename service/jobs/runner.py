"""Composition jobs: run outside the request path, persist state and progress, can be cancelled."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from service.common.metrics import Metrics
from service.jobs.faults import Backoff, Outages, outage_of
from service.jobs.queues import JobQueue, RedisQueue, job_queue
from zoo_store.archs import TapNet
from zoo_store.core.bundle import Bundle, encode_bundle, make_manifest, path_id_of
from zoo_store.core.cards import Card
from zoo_store.core.device import configure_torch, torch_device
from zoo_store.core.errors import NotFound, Unavailable
from zoo_store.core.settings import Settings
from zoo_store.core.spec import CompositionSpec, TaskSpec
from zoo_store.datasets.tasks import TaskData, make_task
from zoo_store.methods import get_method
from zoo_store.methods.base import BuildContext, Cancelled
from zoo_store.store.db import Database, JobRow
from zoo_store.store.store import TERMINAL, Store

log = logging.getLogger("zoo.jobs")


OUTAGE_EXIT = 75  # a job process's exit code when an outage cut its run short (sysexits' EX_TEMPFAIL)
QUEUE_RETRY_AFTER_S = 5  # a compose refused because the queue is away: try again after this long


class Interrupted(Exception):
    """Raised in a build run on a thread when its runner hands the job back (a worker stopping)."""


CURVE_KEYS = ("fraction", "epoch", "loss", "val_accuracy")
CURVE_POINTS = 400  # at most this many points of a job's curve are kept in its progress


def run_job(
    store: Store,
    job_id: str,
    bases: dict[str, tuple[Card, TapNet]] | None,
    device: str,
    interrupted: threading.Event | None = None,
) -> None:
    """Build one job's path and store it with the job's success in one transaction. A job cancelled
    or deleted meanwhile stops at its next step and stores nothing. An outage of the database is
    raised, not recorded as the job's failure (the runner waits it out and runs the job again), and
    so is ``Interrupted``, at the first step after ``interrupted`` is set."""
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

        curve: list[dict[str, float]] = []  # every loss and validation accuracy reported: the job's curves

        def report(**info: Any) -> None:
            now = {k: v for k, v in info.items() if v is not None}
            if "loss" in now or "val_accuracy" in now:
                curve.append({k: now[k] for k in CURVE_KEYS if isinstance(now.get(k), int | float)})
                if len(curve) > CURVE_POINTS:  # every other point of the older half: bounded, still the whole run
                    curve[: CURVE_POINTS // 2] = curve[: CURVE_POINTS // 2 : 2]
            store.update_job(job_id, progress={**now, "curve": list(curve)} if curve else now)

        def cancelled() -> bool:
            if interrupted is not None and interrupted.is_set():
                raise Interrupted(f"job {job_id} handed back")
            try:
                j = store.job(job_id)
            except NotFound:  # deleted
                return True
            return j.cancel_requested or j.state == "cancelled"

        ctx = BuildContext(
            bases=bases, load_task=load_task, device=device, report=report, cancelled=cancelled, cache=store.cache
        )
        art = method.build(spec, ctx)
        manifest = make_manifest(art)  # the tensors hashed once, here; encoded once, below
        data = encode_bundle(manifest, art.tensors, art.metrics)
        bundle = Bundle(path_id_of(manifest), manifest, art.tensors, art.metrics, data)
        store.finish_job(job_id, bundle, {**art.metrics, "bytes": len(data)})
    except Cancelled:
        store.cancel_job(job_id)
    except Exception as e:
        if isinstance(e, Interrupted) or outage_of(e):
            raise
        log.exception("job %s failed", job_id)
        store.update_job(
            job_id, state="failed", error=f"{type(e).__name__}: {e}", progress={"trace": traceback.format_exc()[-2000:]}
        )


def _child_main(settings_json: str, job_id: str, parent: int) -> None:
    from service.common.procs import die_with_parent

    die_with_parent(parent)  # a job never outlives the process that runs the zoo

    def on_stop(signum: int, _frame: object) -> None:
        # SIGTERM or SIGINT sent to the whole process group (a service manager, Ctrl-C): the runner
        # that started this process decides, finishing the job or handing it back. Its death
        # (PR_SET_PDEATHSIG, SIGTERM) ends this process at once.
        if os.getppid() != parent:
            os._exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_stop)
    settings = Settings.model_validate_json(settings_json)
    device = configure_torch(settings)
    db = Database(settings.db_url)
    try:
        run_job(Store.open(settings, db), job_id, None, device)
    except Exception as e:
        if not outage_of(e):
            raise
        log.warning("job %s: cut short by an outage of the %s: %s: %s", job_id, outage_of(e), type(e).__name__, e)
        sys.exit(OUTAGE_EXIT)
    finally:
        db.dispose()


class _GaveUp(Exception):
    """The runner was told to hand its jobs back while it waited for a server to return."""


class _Delivery:
    """One job taken from the queue: its tag, whether its entry is still ours, whether it was handed back."""

    def __init__(self, tag: str, job_id: str):
        self.tag, self.job_id = tag, job_id
        self.lost = False  # the queue lost the entry (Redis restarted empty): handing back adds it again
        self.settled = False
        self.lock = threading.Lock()


class JobRunner:
    """Consumes the queue on background threads; each job in a child process (or a thread in tests).

    A consumer thread never dies: an outage of the database or of Redis is waited out with backoff
    (0.1 s doubling to 5 s; logged once when it starts, once when it heals). A job is acknowledged on
    the queue only once its outcome is committed to the database; a run an outage cut short is run
    again (``ZOO_JOB_ATTEMPTS`` runs in all), then failed with the reason. ``stop`` lets the jobs
    running finish within its grace, then hands them back: marked queued, for another worker now."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        queue: JobQueue,
        metrics: Metrics,
        resident: Callable[[], dict[str, tuple[Card, TapNet]]] | None = None,
    ):
        self.settings, self.store, self.queue, self.metrics = settings, store, queue, metrics
        self.resident = resident
        self._stop = threading.Event()  # take no more jobs
        self._abort = threading.Event()  # hand back the jobs running
        self._threads: list[threading.Thread] = []
        self.procs: dict[str, mp.Process] = {}
        self.outages = Outages()
        self._running: dict[str, _Delivery] = {}  # consumer thread name -> the job it holds
        self._lost = threading.Event()  # the queue lost its entries: send the jobs queued in the database again
        if isinstance(queue, RedisQueue):
            queue.on_reset = self._lost.set

    @classmethod
    def open(cls, settings: Settings) -> JobRunner:
        """A runner and only what it needs: the Settings' database, store and queue (``zoo worker``)."""
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        return cls(settings, Store.open(settings, Database(settings.db_url)), job_queue(settings), Metrics())

    def submit(self, spec: dict[str, Any], tenant: str | None = None) -> JobRow:
        """A new job for the spec (checked by the caller), queued for whichever runner takes it first.
        With the queue away (Redis down) it is refused, Unavailable with Retry-After, and nothing is
        kept: no job row, nothing counted against the tenant's quota."""
        self._queue_or_refuse(self.queue.check)
        row = self.store.create_job(spec, tenant)
        try:
            self._queue_or_refuse(lambda: self.queue.put(row.id))
        except BaseException:
            self.store.delete_job(row.id)  # went away in between: the job was not accepted
            raise
        return row

    def _queue_or_refuse(self, call: Callable[[], None]) -> None:
        try:
            call()
        except Exception as e:
            if outage_of(e) != "queue":
                raise
            raise Unavailable(
                f"the job queue is unreachable ({type(e).__name__}): the job was not queued; "
                f"retry in {QUEUE_RETRY_AFTER_S} s",
                retry_after=QUEUE_RETRY_AFTER_S,
            ) from e

    def recover(self) -> None:
        """At the start of the one embedded server: a job a previous run handed back when it stopped
        is queued, and goes back on the queue with the others queued; a job still marked running was
        lost with a process that died (killed, out of memory) and is failed, not run again."""
        for job_id in self.store.fail_stale_jobs("the server stopped while this job ran; submit it again"):
            self.queue.put(job_id)

    def start(self) -> None:
        for i in range(self.settings.job_workers):
            t = threading.Thread(target=self._loop, name=f"zoo-jobs-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, grace: float = 0.0) -> None:
        """Take no more jobs; let the ones running finish for up to ``grace`` seconds, then hand them
        back (their processes killed, the jobs marked queued, their entries for another worker)."""
        self._stop.set()
        end = time.monotonic() + grace
        for t in self._threads:
            t.join(timeout=max(0.0, end - time.monotonic()))
        self.abort()
        for t in self._threads:
            t.join(timeout=5)
        for name, d in list(self._running.items()):  # a build on a thread that did not reach a step
            log.warning("jobs: %s still runs job %s; handing it back", name, d.job_id)
            self._hand_back(d)

    def abort(self) -> None:
        """Hand back the jobs running now (``stop`` does after its grace; a second SIGTERM at once)."""
        self._stop.set()
        self._abort.set()
        for p in list(self.procs.values()):
            p.kill()

    def cancel(self, job_id: str) -> None:
        """A queued job stops at once; a running one at its next step (its process here: at once)."""
        self.store.cancel_job(job_id)
        proc = self.procs.get(job_id)
        if proc is not None and proc.is_alive():
            proc.kill()  # (a job process leaves SIGTERM to its runner)

    def delete(self, job_id: str) -> None:
        """Cancel the job, then delete it; the path it made, if any, stays."""
        self.cancel(job_id)
        self.store.delete_job(job_id)

    # -- the consumer -------------------------------------------------------------------------------

    def _loop(self) -> None:
        backoff, away = Backoff(), None
        while not self._stop.is_set():
            try:
                self._resend_lost()
                got = self.queue.get(timeout=0.2)
                self.outages.up("queue")
                self._resend_lost()  # (before a job taken at the same look: it may run long)
                if away:
                    self.outages.up(away)
                    away = None
                if got is not None:
                    self._take(*got)
                backoff.reset()
            except _GaveUp:
                return
            except Exception as e:  # never a dead consumer: wait, then take jobs again
                away = outage_of(e)
                if away:
                    self.outages.down(away, e)
                else:
                    log.exception("jobs: the consumer failed; it goes on after a pause")
                if backoff.wait(self._stop):
                    return

    def _resend_lost(self) -> None:
        """The queue lost its entries (Redis restarted empty): the jobs the database still has queued
        go on it again (each once: those on it already are left). Tried again at the next look when
        the database is away."""
        if not self._lost.is_set():
            return
        try:
            present = self.queue.job_ids()
            missing = [j for j in self.store.queued_jobs() if j not in present]
            for job_id in missing:
                self.queue.put(job_id)
        except Exception as e:
            if not outage_of(e):
                raise
            self.outages.down(outage_of(e), e)
            return
        self.outages.up("database")
        self.outages.up("queue")
        self._lost.clear()
        if missing:
            log.warning("jobs: %d job(s) queued in the database sent again to the new stream", len(missing))

    def _take(self, tag: str, job_id: str) -> None:
        """Run one job taken from the queue to an outcome committed to the database, then acknowledge it;
        or hand it back (stopping)."""
        d = _Delivery(tag, job_id)
        name = threading.current_thread().name
        self._running[name] = d
        done = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(d, done), daemon=True)
        beat.start()
        try:
            state = self._until_done(d)
        except _GaveUp:  # told to hand back while a server was away
            self._hand_back(d)
            raise
        finally:
            done.set()
            beat.join()
            self._running.pop(name, None)
        if state is None:  # handed back
            return
        self._retrying("queue", lambda: self.queue.ack(tag))
        self.metrics.jobs.labels(state).inc()

    def _until_done(self, d: _Delivery) -> str | None:
        """Run the job until it ends (its state, "cancelled" if deleted) or is handed back (None)."""
        attempts, reason = 0, "its run ended without an outcome"
        while True:
            state = self._retrying("database", lambda: self.store.job_state(d.job_id))
            if state is None or state in TERMINAL:
                return state or "cancelled"  # deleted: it was cancelled first
            if self._abort.is_set() or (attempts == 0 and self._stop.is_set()):
                self._hand_back(d)
                return None
            if attempts >= self.settings.job_attempts:
                error = f"{reason}; gave up after {attempts} attempt(s)"
                self._retrying(
                    "database", lambda error=error: self.store.update_job(d.job_id, state="failed", error=error)
                )
                continue  # read back: failed, or cancelled meanwhile
            attempts += 1
            log.info("jobs: job %s, attempt %d, runs in this worker", d.job_id, attempts)
            outcome = self._execute(d.job_id)
            if self._abort.is_set():
                continue  # ended or not, the next look decides: done, or handed back
            if outcome is None:
                continue
            what, reason = outcome
            if what == "stopped":
                self._hand_back(d)
                return None
            if what == "failed":  # not an outage: the job fails now, as it always did
                self._retrying(
                    "database", lambda reason=reason: self.store.update_job(d.job_id, state="failed", error=reason)
                )
                continue
            log.warning(
                "jobs: job %s, attempt %d of %d, cut short: %s", d.job_id, attempts, self.settings.job_attempts, reason
            )

    def _retrying(self, what: str, call: Callable[[], Any]) -> Any:
        """``call()`` on ``what`` ("database" or "queue") until no outage stops it (other errors are
        raised); _GaveUp once told to abort while waiting."""
        backoff = Backoff()
        while True:
            try:
                out = call()
            except Exception as e:
                away = outage_of(e)
                if not away:
                    raise
                self.outages.down(away, e)
                if backoff.wait(self._abort):
                    raise _GaveUp from e
                continue
            self.outages.up(what)
            return out

    def _hand_back(self, d: _Delivery) -> None:
        """The job goes back: marked queued (unless it ended meanwhile), its entry for another worker
        now. With a server away, as much as can be done: an entry left is re-delivered after its idle time."""
        with d.lock:
            if d.settled:
                return
            d.settled = True
        try:
            self.store.requeue_job(d.job_id)
        except Exception as e:
            log.warning(
                "jobs: job %s could not be marked queued (%s); another worker runs it again from its entry",
                d.job_id,
                type(e).__name__,
            )
        try:
            self.queue.put(d.job_id) if d.lost else self.queue.release(d.tag, d.job_id)
            log.warning("jobs: job %s handed back", d.job_id)
        except Exception as e:
            log.warning(
                "jobs: job %s could not be handed back to the queue (%s); it is taken over after %.0f s idle",
                d.job_id,
                type(e).__name__,
                self.settings.job_claim_idle_s,
            )

    def _heartbeat(self, d: _Delivery, done: threading.Event) -> None:
        """Keep the job ours on the queue while it runs, however long it takes."""
        while not done.wait(self.queue.heartbeat_s):
            try:
                if not self.queue.touch(d.tag) and not d.lost:
                    d.lost = True
                    log.warning(
                        "jobs: the queue lost the entry of job %s (Redis restarted empty?); "
                        "it is added again if the job is handed back",
                        d.job_id,
                    )
                self.outages.up("queue")
            except Exception as e:
                what = outage_of(e)
                if what:
                    self.outages.down(what, e)
                else:
                    log.warning("could not renew the claim on %s", d.tag, exc_info=True)

    def _execute(self, job_id: str) -> tuple[str, str] | None:
        """Run the job once: None when the run ended having recorded what it could, else why it did
        not: ("outage", reason) to run it again, ("failed", reason) to fail it."""
        if self.settings.job_executor == "thread":
            try:
                run_job(
                    self.store,
                    job_id,
                    self.resident() if self.resident else None,
                    torch_device(self.settings),
                    self._abort,
                )
            except Interrupted:
                return None
            except Exception as e:
                what = outage_of(e)
                if what:
                    self.outages.down(what, e)
                    return "outage", f"the {what} went away while it ran ({type(e).__name__})"
                log.exception("job %s failed", job_id)
                return "failed", f"{type(e).__name__}: {e}"
            return None
        ctx = mp.get_context("spawn")
        proc = ctx.Process(target=_child_main, args=(self.settings.model_dump_json(), job_id, os.getpid()), daemon=True)
        self.procs[job_id] = proc
        proc.start()
        while proc.is_alive():
            if self._abort.is_set():
                proc.kill()
            proc.join(timeout=0.2)
        self.procs.pop(job_id, None)
        if proc.exitcode == OUTAGE_EXIT:
            return "outage", "an outage cut its job process short"
        if proc.exitcode in (-signal.SIGTERM, -signal.SIGINT) and self._stop.is_set():
            return "stopped", "stopped with its runner"  # signalled before it could leave that to us
        if proc.exitcode != 0 and not self._abort.is_set():  # (a job that ended, or is gone, is not changed)
            return "failed", f"job process exited with code {proc.exitcode}"
        return None
