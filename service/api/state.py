"""Everything the routes share, built once per app from the Settings."""

from __future__ import annotations

import gc
import logging
import secrets
import sys
import threading
from dataclasses import dataclass, field

from service.api.audit import AuditLog
from service.api.auth import Auth
from service.api.quotas import MemoryBuckets, Quotas, RedisBuckets
from service.common.metrics import Metrics
from service.common.ttl import TtlCache
from service.jobs.queues import JobQueue, job_queue
from service.jobs.runner import JobRunner
from service.runtime.batcher import Batcher
from service.runtime.cache import Entry, PathCache
from service.runtime.exports import ExportCache
from service.runtime.zoo import ResidentZoo
from zoo_store.core.device import configure_torch
from zoo_store.core.errors import NotFound, Unavailable, ZooError
from zoo_store.core.manifest import Manifest
from zoo_store.core.settings import Settings
from zoo_store.store.blobs import BlobStore
from zoo_store.store.db import DEMO_ZOO_LOCK_KEY, Database
from zoo_store.store.demo import ensure_demo_zoo
from zoo_store.store.store import Store
from zoo_store.store.tenancy import Caller

ACCESS_TTL_S = 2.0  # a tenant's access to a path, once checked, is not checked again for this long

log = logging.getLogger("zoo")


@dataclass
class Services:
    settings: Settings
    db: Database
    store: Store
    zoo: ResidentZoo
    cache: PathCache
    batcher: Batcher
    runner: JobRunner
    metrics: Metrics
    auth: Auth
    quotas: Quotas
    audit: AuditLog
    exports: ExportCache
    ready: threading.Event = field(default_factory=threading.Event)
    startup_error: str | None = None
    loading: str = "loading the zoo"  # what /readyz says until ready: the demo build's last step
    stopping: threading.Event = field(default_factory=threading.Event)
    _access: TtlCache = field(default_factory=lambda: TtlCache(ACCESS_TTL_S))  # (tenant, path id) -> may use it

    @classmethod
    def create(cls, settings: Settings, blobs: BlobStore | None = None, queue: JobQueue | None = None) -> Services:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        metrics = Metrics()
        db = Database(settings.db_url)
        # the in-memory twin of the blob store comes with an in-memory cache
        store = Store(db, blobs, None) if blobs else Store.open(settings, db)
        zoo = ResidentZoo(store, configure_torch(settings))
        cache = PathCache(
            store,
            zoo,
            settings.cache_bytes,
            metrics,
            frozenset(settings.pinned_paths),
            host_budget=settings.host_cache_bytes,
            batching=settings.batching,
            min_slots=settings.max_batch_size,
        )
        batcher = Batcher(
            zoo.device, settings.max_batch_size, settings.max_wait_ms, metrics, cache, settings.max_queue_inputs
        )
        runner = JobRunner(settings, store, queue or job_queue(settings), metrics, resident=lambda: zoo.bases)
        buckets = RedisBuckets(settings.redis_url) if settings.mode == "distributed" else MemoryBuckets()
        auth = Auth(db, settings.auth, settings.outage_stale_s)
        return cls(
            settings,
            db,
            store,
            zoo,
            cache,
            batcher,
            runner,
            metrics,
            auth,
            Quotas(settings, db, store, buckets),
            AuditLog(db),
            ExportCache(settings.data_dir / "exports", store, zoo),
        )

    def start(self) -> None:
        """Migrate, register built-in datasets, then build/load the zoo on a background thread."""
        self.db.migrate()
        self.auth.first_admin_key(self.settings.data_dir)
        self._print_sign_in_link()
        self.store.ensure_builtin_datasets()
        threading.Thread(target=self._load_zoo, name="zoo-load", daemon=True).start()

    def _print_sign_in_link(self) -> None:
        """Like Jupyter: once, at start, on stderr, a link that signs a browser in (its one-time token rides
        in the URL's fragment, which no access log sees; ``zoo dashboard`` makes another)."""
        if self.auth.enabled and self.settings.public_url and self.settings.sign_in_link:
            _, token = self.auth.keys.sign_in_token()
            url = f"{self.settings.public_url.rstrip('/')}/#token={token}"
            print(f"zoo: the dashboard, signed in (once, within 15 minutes): {url}", file=sys.stderr, flush=True)

    def _load_zoo(self) -> None:
        try:
            if self.settings.demo_zoo:
                self.loading = "demo zoo: waiting for another process that builds it"
                with self.db.exclusive(DEMO_ZOO_LOCK_KEY):  # replicas starting together train it once
                    ensure_demo_zoo(self.store, self.settings.demo_samples, say=self._say)
            self.loading = "loading the bases into memory"
            self.zoo.load_all()
            self._warm_pinned()
            if self.settings.mode == "embedded":
                self.runner.recover()
                self.runner.start()
            gc.collect()
            gc.freeze()  # the resident zoo and everything loaded so far: never scanned by the collector again
            self.ready.set()
            log.warning("zoo ready: %d bases resident on %s", len(self.zoo.bases), self.zoo.device)
            self._follow()
        except Exception:  # the cause goes to the log only: /readyz answers anyone
            ref = secrets.token_hex(4)
            self.startup_error = f"the zoo failed to load (ref {ref}); the server's log has the cause"
            log.exception("zoo failed to load (ref %s)", ref)

    def _follow(self) -> None:
        """Every ``zoo_poll_s``, load the bases registered through other processes and drop from
        the path cache the paths deleted through them (on a background thread)."""
        seq = self.store.deletions_since(None)[0]

        def evict_deleted() -> None:
            nonlocal seq
            seq, deleted = self.store.deletions_since(seq)
            for path_id in deleted:
                self.cache.evict(path_id)
                self.exports.forget(path_id)

        self.zoo.follow_every(self.settings.zoo_poll_s, self.stopping, also=evict_deleted)

    def admit_predict(self, caller: Caller, path_id: str) -> None:
        """A predict: the caller may use the path, and is under its tenant's predict rate."""
        self.check_access(caller, path_id)
        self.quotas.predict(caller)

    def admitted_entry(self, caller: Caller, path_id: str) -> Entry:
        """For a predict, off the event loop (it may ask the database, or Redis): admission, room in
        the queue (a full one is refused before any work is done), then the path's entry, loaded on
        first use. One worker-thread hop for all three: a cold predict's load costs none of its own."""
        self.admit_predict(caller, path_id)
        self.batcher.check_room()
        return self.cache.get(path_id)

    def admitted_base(self, caller: Caller, base_id: str) -> Entry:
        """``admitted_entry`` for a base served by itself: every key may use any base (every tenant
        reads the zoo), under its tenant's predict rate; then room in the queue."""
        self.quotas.predict(caller)
        self.batcher.check_room()
        return self.base_entry(base_id)

    def base_entry(self, base_id: str) -> Entry:
        """A base as a model of its own; one registered through another process is loaded first
        (NotFound when there is none)."""
        if base_id not in self.zoo.bases:
            self.zoo.add(self.store.card(base_id))
        return Entry.of_base(*self.zoo.bases[base_id])

    def describe_base(self, key: str | None, base_id: str) -> Entry:
        """``describe`` for a base: the key is checked (not a use: no rate counted), then the base."""
        self.auth.caller(key)
        return self.base_entry(base_id)

    def describe(self, key: str | None, path_id: str) -> Manifest:
        """For a worker's first predict of a path, off the event loop: the key's access to the path
        (not a use: no rate counted), then its manifest; a path not loaded yet starts loading."""
        self.check_access(self.auth.caller(key), path_id)
        return self.cache.manifest(path_id)

    def keyed_entry(self, key: str | None, path_id: str, base: bool = False) -> Entry:
        """``admitted_entry`` (``admitted_base`` when ``base``) for the bearer of ``key`` (the device
        channel's predicts)."""
        caller = self.auth.caller(key)
        return self.admitted_base(caller, path_id) if base else self.admitted_entry(caller, path_id)

    def check_access(self, caller: Caller, path_id: str) -> None:
        """NotFound unless the caller may use the path (an admin any that exists; the serving path
        finds out whether it does). Checked once per ``ACCESS_TTL_S`` per tenant and path; while the
        database is unreachable, a decision made at most ``outage_stale_s`` ago stands."""
        if caller.admin:
            return
        role = self._access.get_or(
            (caller.tenant, path_id),
            lambda: self.store.role(path_id, caller.tenant),
            stale_s=self.settings.outage_stale_s,
            stale_on=(Unavailable,),
        )
        if role is None:
            raise NotFound(f"no path {path_id!r}")

    def forget_access(self, path_id: str) -> None:
        """Access to the path changed here: checked afresh on its next use."""
        self._access.drop(lambda key: key[1] != path_id)

    def _warm_pinned(self) -> None:
        for path_id in sorted(self.cache.pinned):
            try:
                self.cache.get(path_id)
            except ZooError as e:  # a pinned path that is gone or broken must not keep the zoo down
                log.warning("pinned path %s not materialized: %s", path_id, e)

    def _say(self, message: str) -> None:
        self.loading = message
        log.warning(message)

    def stop(self) -> None:
        self.stopping.set()
        self.runner.stop()
        self.batcher.close()
        self.cache.close()
        self.db.dispose()
