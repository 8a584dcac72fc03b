"""Outages of the job runner's two servers (PostgreSQL, Redis): which error is one, how long to
wait before trying again, and one log line when one starts and one when it heals."""

from __future__ import annotations

import logging
import threading
import time

from zoo_store.core.errors import DatabaseUnreachable

log = logging.getLogger("zoo.jobs")

BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.1, 5.0


def outage_of(e: BaseException | None) -> str | None:
    """``"database"`` or ``"queue"`` when the error (or one it was raised from, or while handling)
    is a server that cannot be reached or a connection that was cut; None for any other error."""
    import redis.exceptions as rx
    from sqlalchemy import exc as sx

    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DatabaseUnreachable | sx.OperationalError | sx.InterfaceError) or (
            isinstance(e, sx.DBAPIError) and e.connection_invalidated
        ):
            return "database"
        if isinstance(e, (rx.ConnectionError, rx.TimeoutError)):
            return "queue"
        e = e.__cause__ or e.__context__
    return None


class Backoff:
    """Waits that double from ``first`` up to ``cap`` seconds; ``reset`` after a success."""

    def __init__(self, first: float = BACKOFF_FIRST_S, cap: float = BACKOFF_MAX_S):
        self.first, self.cap, self.next = first, cap, first

    def wait(self, stop: threading.Event) -> bool:
        """Sleep the next wait (woken early by ``stop``); whether ``stop`` is set."""
        delay, self.next = self.next, min(self.cap, self.next * 2)
        return stop.wait(delay)

    def reset(self) -> None:
        self.next = self.first


class Outages:
    """What is down now, shared by a runner's threads: one warning when a server goes away, one
    when it answers again (with how long it was away), nothing in between."""

    def __init__(self) -> None:
        self._since: dict[str, float] = {}
        self._lock = threading.Lock()

    def down(self, what: str, e: BaseException) -> None:
        with self._lock:
            if what in self._since:
                return
            self._since[what] = time.monotonic()
        log.warning(
            "jobs: the %s is unreachable (%s: %s); retrying with backoff up to %.0f s",
            what,
            type(e).__name__,
            str(e).splitlines()[0][:200] if str(e) else "",
            BACKOFF_MAX_S,
        )

    def up(self, what: str) -> None:
        if what not in self._since:  # (unlocked read: the common case costs nothing)
            return
        with self._lock:
            since = self._since.pop(what, None)
        if since is not None:
            log.warning("jobs: the %s answers again after %.1f s", what, time.monotonic() - since)

    def is_down(self, what: str) -> bool:
        return what in self._since
