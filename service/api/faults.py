"""Exceptions from below (the database's driver and pool, Redis, the disk) that are known conditions
rather than bugs, as the domain errors they are to a client; ``errors.install_error_handlers``
answers them with the rest of the tree. Driver errors are mostly mapped where they arise
(``zoo_store.store.db.Database``); this catches the rest."""

from __future__ import annotations

import redis
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from zoo_store.core.errors import Unavailable, ZooError, storage_full
from zoo_store.store.db import driver_problem

RETRY_AFTER_S = 2
BELOW: tuple[type[BaseException], ...] = (OSError, DBAPIError, PoolTimeout, redis.ConnectionError, redis.TimeoutError)


def known(e: BaseException) -> ZooError | None:
    """The ZooError that an exception from below is when it is a known condition rather than a bug:
    a full disk (507), the database or Redis unreachable (503 with Retry-After); None otherwise."""
    if (full := storage_full(e)) is not None:
        return full
    if isinstance(e, DBAPIError):
        return driver_problem(e.orig, e.connection_invalidated)
    if isinstance(e, PoolTimeout):  # every pooled connection busy for the pool's timeout
        return Unavailable("the database is busy; retry shortly", retry_after=RETRY_AFTER_S)
    if isinstance(e, redis.ConnectionError | redis.TimeoutError):  # the job queue's Redis (the rate limiter falls back)
        return Unavailable("the job queue is unreachable for a moment; retry shortly", retry_after=RETRY_AFTER_S)
    return None
