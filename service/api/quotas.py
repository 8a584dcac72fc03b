"""Per-tenant quotas (403 naming the limit) and the predict rate limit (429 with Retry-After): the
Settings' defaults, overridden per tenant in the database; a token bucket per tenant, in this
process (embedded mode) or in Redis (distributed mode: one bucket for every replica; while Redis is
unreachable, one in each process, so that predicts go on). Admins' keys are not limited."""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Annotated, Protocol

from pydantic import BaseModel, ConfigDict, Field

from service.api.schemas import WHOLE
from service.common.ttl import TtlCache
from zoo_store.core.errors import Forbidden, TooManyRequests, Unavailable
from zoo_store.core.outage import Outage
from zoo_store.core.settings import Settings
from zoo_store.store.db import Database, TenantLimitsRow
from zoo_store.store.store import Store
from zoo_store.store.tenancy import Caller

LIMITS_TTL_S = 2.0  # a tenant's limits, once read, are read again after this long
REDIS_RETRY_S = 1.0  # while Redis is unreachable, it is tried again this often (the buckets of this process meanwhile)
REDIS_TIMEOUT_S = 1.0  # a bucket's round trip: beyond it, Redis counts as unreachable
log = logging.getLogger("zoo.quotas")
Count = Annotated[int, Field(ge=0), WHOLE]


class Limits(BaseModel):
    """A tenant's limits. As an override, a field left out (or null) takes the Settings' default."""

    model_config = ConfigDict(extra="forbid", strict=True)
    max_jobs: Count | None = Field(None, description="jobs queued or running at once")
    max_paths: Count | None = Field(None, description="paths it owns (and jobs that will make one)")
    max_path_bytes: Count | None = Field(None, description="bytes of the paths it owns")
    max_dataset_bytes: Count | None = Field(None, description="bytes of the datasets it uploaded")
    predict_rate: Annotated[float, Field(ge=0.01, le=1e6)] | None = Field(
        None, description="predict requests per second"
    )
    predict_burst: Annotated[int, Field(ge=1, le=10**6), WHOLE] | None = Field(
        None, description="predict requests at once (the token bucket's size)"
    )

    @classmethod
    def defaults(cls, s: Settings) -> Limits:
        return cls(
            max_jobs=s.tenant_max_jobs,
            max_paths=s.tenant_max_paths,
            max_path_bytes=s.tenant_max_path_bytes,
            max_dataset_bytes=s.tenant_max_dataset_bytes,
            predict_rate=s.tenant_predict_rate,
            predict_burst=s.tenant_predict_burst,
        )


class Buckets(Protocol):
    def take(self, tenant: str, rate: float, burst: int) -> float: ...  # 0 when allowed, else seconds to wait
    def unreachable(self) -> str | None: ...  # why the shared buckets cannot be reached now (None: they can)


class MemoryBuckets:
    """Token buckets in this process."""

    def __init__(self) -> None:
        self._state: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, tenant: str, rate: float, burst: int) -> float:
        now = time.monotonic()
        with self._lock:
            tokens, at = self._state.get(tenant, (float(burst), now))
            tokens = min(float(burst), tokens + (now - at) * rate)
            if tokens >= 1:
                self._state[tenant] = (tokens - 1, now)
                return 0.0
            self._state[tenant] = (tokens, now)
            return (1 - tokens) / rate

    def unreachable(self) -> str | None:
        return None


# KEYS[1]: the bucket; ARGV: rate, burst. Redis's own clock, so that every replica agrees.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = math.min(burst, (tonumber(b[1]) or burst) + (now - (tonumber(b[2]) or now)) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return tostring(wait)
"""


class RedisBuckets:
    """One token bucket per tenant shared by every replica (a Lua script: atomic). While Redis is
    unreachable, the buckets of this process (``MemoryBuckets``) take over: predicts are answered,
    each replica holding a tenant to its rate by itself; Redis is tried again every ``REDIS_RETRY_S``
    and its buckets are used again as soon as it answers. Logged once per outage."""

    def __init__(self, url: str, prefix: str = "zoo:rate:"):
        import redis

        self.r = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S)
        self.script = self.r.register_script(_TAKE)
        self.prefix = prefix
        self.local = MemoryBuckets()
        self.outage = Outage("Redis unreachable: predict rates are held per process until it is back", log)
        self._retry_at = 0.0
        self._probing = threading.Lock()
        self._down = (redis.ConnectionError, redis.TimeoutError)  # BusyLoadingError (starting up) is one too

    def take(self, tenant: str, rate: float, burst: int) -> float:
        if self.outage.down:
            with self._probing:  # one request asks Redis again, once per REDIS_RETRY_S; the others use local buckets
                now = time.monotonic()
                probe = now >= self._retry_at
                if probe:
                    self._retry_at = now + REDIS_RETRY_S
            if not probe:
                return self.local.take(tenant, rate, burst)
        try:
            wait = float(self.script(keys=[self.prefix + tenant], args=[rate, burst]))
        except self._down as e:
            self._retry_at = time.monotonic() + REDIS_RETRY_S
            self.outage.failed(f"{type(e).__name__}: {e}")
            return self.local.take(tenant, rate, burst)
        self.outage.recovered()
        return wait

    def unreachable(self) -> str | None:
        """None when Redis answers a PING; else why not (for /readyz)."""
        try:
            self.r.ping()
        except self._down as e:
            self.outage.failed(f"{type(e).__name__}: {e}")
            return "unreachable"
        return None


class Quotas:
    def __init__(self, settings: Settings, db: Database, store: Store, buckets: Buckets):
        self.settings, self.db, self.store, self.buckets = settings, db, store, buckets
        self._seen = TtlCache(LIMITS_TTL_S)

    def limits(self, tenant: str) -> Limits:
        """The tenant's limits: its overrides over the Settings' defaults (while the database is
        unreachable, as read at most ``outage_stale_s`` ago)."""
        return self._seen.get_or(
            tenant, lambda: self._read(tenant), stale_s=self.settings.outage_stale_s, stale_on=(Unavailable,)
        )

    def _read(self, tenant: str) -> Limits:
        with self.db.session() as s:
            row = s.get(TenantLimitsRow, tenant)
        own = {k: v for k, v in (row.limits if row else {}).items() if v is not None}
        return Limits.defaults(self.settings).model_copy(update=own)

    def set_limits(self, tenant: str, limits: Limits) -> Limits:
        with self.db.session() as s:
            s.merge(TenantLimitsRow(tenant=tenant, limits=limits.model_dump(exclude_none=True)))
        return self._seen.put(tenant, self._read(tenant))

    def predict(self, caller: Caller) -> None:
        """One predict request: TooManyRequests (with Retry-After) over the tenant's rate."""
        if caller.admin:
            return
        lim = self.limits(caller.tenant)
        wait = self.buckets.take(caller.tenant, lim.predict_rate, lim.predict_burst)
        if wait > 0:
            raise TooManyRequests(
                f"tenant {caller.tenant!r} is over its predict rate ({lim.predict_rate:g}/s, "
                f"bursts of {lim.predict_burst}); retry after {wait:.2f} s",
                retry_after=math.ceil(wait),
            )

    def new_job(self, caller: Caller) -> None:
        """A composition: room for one more job and for the path it makes."""
        if caller.admin:
            return
        lim, use = self.limits(caller.tenant), self.store.usage(caller.tenant)
        self._check(caller, "max_jobs", use["jobs"] + 1, lim.max_jobs, "jobs queued or running")
        self._check(
            caller, "max_paths", use["paths"] + use["jobs"] + 1, lim.max_paths, "paths (jobs under way included)"
        )
        self._check(caller, "max_path_bytes", use["path_bytes"] + 1, lim.max_path_bytes, "bytes of paths")

    def new_path(self, caller: Caller, nbytes: int) -> None:
        if caller.admin:
            return
        lim, use = self.limits(caller.tenant), self.store.usage(caller.tenant)
        self._check(
            caller, "max_paths", use["paths"] + use["jobs"] + 1, lim.max_paths, "paths (jobs under way included)"
        )
        self._check(caller, "max_path_bytes", use["path_bytes"] + nbytes, lim.max_path_bytes, "bytes of paths")

    def new_dataset(self, caller: Caller, nbytes: int) -> None:
        if caller.admin:
            return
        lim, use = self.limits(caller.tenant), self.store.usage(caller.tenant)
        self._check(
            caller, "max_dataset_bytes", use["dataset_bytes"] + nbytes, lim.max_dataset_bytes, "bytes of datasets"
        )

    @staticmethod
    def _check(caller: Caller, name: str, would: int, limit: int | None, what: str) -> None:
        if limit is not None and would > limit:
            raise Forbidden(f"tenant {caller.tenant!r} would have {would:,} {what}, over its {name} of {limit:,}")
