"""A small cache for what a request checks again and again (a key, a tenant's access to a path,
its limits): bounded, each entry good for ``ttl`` seconds, safe across threads."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

MISSING: Any = object()


class TtlCache:
    def __init__(self, ttl: float, max_items: int = 100_000):
        self.ttl, self.max_items = ttl, max_items
        self._items: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()

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

    def get_or(self, key: Hashable, make: Callable[[], Any]) -> Any:
        value = self.get(key)
        return self.put(key, make()) if value is MISSING else value

    def drop(self, keep: Callable[[Hashable], bool]) -> None:
        """Forget every entry whose key ``keep`` says no to."""
        with self._lock:
            for key in [k for k in self._items if not keep(k)]:
                del self._items[key]
