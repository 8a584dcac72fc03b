"""A dependency that fails for a while (a database restarting, Redis away, a disk full): one warning
when the outage starts, one when it ends, and in between a count instead of a line per request (a
reminder every ``remind_s`` while it lasts). Failures further apart than ``remind_s`` with no
recovery seen in between are separate outages."""

from __future__ import annotations

import logging
import threading
import time


class Outage:
    def __init__(self, what: str, log: logging.Logger, remind_s: float = 60.0):
        """``what``: the condition, as the log names it ("database unreachable")."""
        self.what, self.log, self.remind_s = what, log, remind_s
        self.since: float | None = None  # monotonic time of the first failure of the outage under way
        self.failures = 0
        self._said = self._last = 0.0
        self._lock = threading.Lock()

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, why: str) -> bool:
        """One failure (``why``: for the log only, never for a client). True when it began an outage."""
        now = time.monotonic()
        with self._lock:
            new = self.since is None or now - self._last > self.remind_s
            self._last, self.failures = now, (1 if new else self.failures + 1)
            if new:
                self.since = self._said = now
                self.log.warning("%s: %s", self.what, why)
            elif now - self._said >= self.remind_s:
                self._said = now
                self.log.warning(
                    "%s for %.0f s (%d failures so far): %s", self.what, now - self.since, self.failures, why
                )
            return new

    def recovered(self) -> None:
        """A success: the outage under way, if any, is over."""
        if self.since is None:  # the usual case, without the lock
            return
        with self._lock:
            if self.since is None:
                return
            self.log.warning(
                "%s: over after %.1f s (%d failures meanwhile)", self.what, time.monotonic() - self.since, self.failures
            )
            self.since, self.failures = None, 0
