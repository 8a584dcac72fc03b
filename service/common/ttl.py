"""A small cache for what a request checks again and again (a key, a tenant's access to a path,
its limits): bounded, each entry good for ``ttl`` seconds, safe across threads. ``get_or`` may serve
an older entry while its source is down (``stale_s``)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

MISSING: Any = object()
RETRY_S = 1.0  # after a failed lookup, stale entries are served without asking the source again for this long


class TtlCache:
    def __init__(self, ttl: float, max_items: int = 100_000):
        self.ttl, self.max_items = ttl, max_items
        self._items: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self._failed_at = -RETRY_S  # monotonic time of the last lookup that failed and was answered stale

    def get(self, key: Hashable) -> Any:
        """The value, or ``MISSING`` when absent or older than ``ttl``."""
        with self._lock:
            item = self._items.get(key)
            if item is None or time.monotonic() - item[0] > self.ttl:
                return MISSING
            return item[1]

    def put(self, key: Hashable, value: Any) -> Any:
        with self._lock:
            self._items[key] = (time.monotonic(), value)
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
        return value

    def get_or(
        self,
        key: Hashable,
        make: Callable[[], Any],
        stale_s: float = 0.0,
        stale_on: tuple[type[BaseException], ...] = (),
    ) -> Any:
        """The value, else ``make()``'s (kept). When ``make`` raises one of ``stale_on`` (its source is
        down), an entry made at most ``stale_s`` ago is answered instead, and for ``RETRY_S`` after
        that failure such entries are answered without calling ``make``; with none, the error is raised."""
        with self._lock:
            item = self._items.get(key)
        now = time.monotonic()
        if item is not None:
            age = now - item[0]
            if age <= self.ttl or (age <= stale_s and now - self._failed_at < RETRY_S):
                return item[1]
        try:
            value = make()
        except stale_on:
            if item is None or time.monotonic() - item[0] > stale_s:
                raise
            self._failed_at = time.monotonic()
            return item[1]
        return self.put(key, value)

    def drop(self, keep: Callable[[Hashable], bool]) -> None:
        """Forget every entry whose key ``keep`` says no to."""
        with self._lock:
            for key in [k for k in self._items if not keep(k)]:
                del self._items[key]
