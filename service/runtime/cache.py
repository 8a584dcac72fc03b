"""The path memory: modules in a byte-bounded LRU, decoded tensors in a host tier, and the slot
tables of each base's bank.

A path is served one of two ways. If its method has a bank (reprogram), its decoded tensors sit in
a host-memory tier and, when a batch needs it, in a slot of its base's bank: one forward serves a
batch that mixes many such paths. Otherwise it is materialized as its own module (kept in an LRU)
and batched with requests for the same path only. Both share the cache's byte budget; the
database is beneath both.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from service.common.metrics import Metrics
from service.runtime.zoo import ResidentZoo
from zoo_store.archs.surgery import tensor_bytes
from zoo_store.core.bundle import decode_stored
from zoo_store.core.cards import Card, InputSpec
from zoo_store.core.errors import ZooError
from zoo_store.core.manifest import Manifest
from zoo_store.methods import get_method
from zoo_store.methods.bank import PathBank
from zoo_store.store.store import Store

log = logging.getLogger("zoo")


@dataclass
class Entry:
    """A path ready to serve: its own module, or its decoded tensors for a slot of bank ``bank_key``;
    or a base served by itself (``Entry.of_base``: its resident network, its card's input and labels)."""

    path_id: str  # a path's id, or a base's (ids of the two never collide: see ``is_path_id``)
    manifest: Manifest | None  # None for a base
    nbytes: int  # what it holds: the module's delta over the bases, or its decoded tensors
    module: nn.Module | None = None
    tensors: dict[str, torch.Tensor] | None = None
    bank_key: str | None = None
    card: Card | None = None  # a base's card

    @classmethod
    def of_base(cls, card: Card, net: nn.Module) -> Entry:
        return cls(card.id, None, 0, module=net, card=card)

    @property
    def input(self) -> InputSpec:
        return self.card.input if self.card is not None else self.path_manifest.input

    @property
    def labels(self) -> tuple[str, ...]:
        return self.card.labels if self.card is not None else self.path_manifest.labels

    @property
    def path_manifest(self) -> Manifest:
        """A path's manifest (not a base's: it has none)."""
        assert self.manifest is not None, f"{self.path_id} is a base, not a path"
        return self.manifest

    @property
    def group(self) -> str:
        """What its requests are batched with: every path of its bank, or only itself (a base: ``base:<id>``,
        apart from any bank key, which has the form ``<method>:<base>:...``)."""
        return self.bank_key or (f"base:{self.path_id}" if self.card is not None else self.path_id)


def delta_bytes(module: nn.Module, shared: set[int]) -> int:
    """Bytes a materialized path adds on top of the resident bases."""
    return tensor_bytes(t for t in [*module.parameters(), *module.buffers()] if t.data_ptr() not in shared)


class ByteLRU:
    """Entries by path id, least recently used first, with their byte total. Not thread-safe."""

    def __init__(self) -> None:
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self.nbytes = 0

    def get(self, path_id: str) -> Entry | None:
        entry = self.entries.get(path_id)
        if entry is not None:
            self.entries.move_to_end(path_id)
        return entry

    def put(self, entry: Entry) -> None:
        self.pop(entry.path_id)
        self.entries[entry.path_id] = entry
        self.nbytes += entry.nbytes

    def pop(self, path_id: str) -> Entry | None:
        entry = self.entries.pop(path_id, None)
        if entry is not None:
            self.nbytes -= entry.nbytes
        return entry

    def evict_over(self, budget: int, keep: frozenset[str], extra: int = 0) -> None:
        """Least recently used first until ``nbytes + extra <= budget``; never ``keep`` nor the newest."""
        if self.nbytes + extra <= budget:
            return
        newest = next(reversed(self.entries), None)
        for path_id in [k for k in self.entries if k not in keep and k != newest]:
            if self.nbytes + extra <= budget:
                break
            self.pop(path_id)


class SlotTable:
    """Which path sits in which slot of one bank. A path missing from the table is copied into a
    free slot; with none free the table grows (doubling) while the budget has room, else the least
    recently used slot that the batch at hand does not need and that holds no pinned path is reused."""

    def __init__(
        self,
        key: str,
        bank: PathBank,
        room: Callable[[], int],
        pinned: frozenset[str],
        metrics: Metrics,
        min_slots: int,
    ):
        self.key, self.bank, self.room, self.pinned, self.metrics = key, bank, room, pinned, metrics
        self.min_slots = min_slots
        self.where: OrderedDict[str, int] = OrderedDict()  # path id -> slot, least recently used first
        self.free: list[int] = []  # descending, so pop() gives the lowest
        self.lock = threading.Lock()

    def assign(self, entries: list[Entry]) -> list[int]:
        """The slot of each entry's path, loading the missing ones (called by the inference thread)."""
        with self.lock:
            needed = {e.path_id: e for e in entries}
            for path_id, entry in needed.items():
                if path_id in self.where:
                    self.where.move_to_end(path_id)
                    continue
                slot = self._take(frozenset(needed), entry)
                self.bank.load(slot, entry.path_manifest.config, entry.tensors or {})
                self.where[path_id] = slot
                self.metrics.slot_loads.labels(self.key).inc()
            self.metrics.slots_in_use.labels(self.key).set(len(self.where))
            return [self.where[e.path_id] for e in entries]

    def _take(self, protect: frozenset[str], entry: Entry) -> int:
        if not self.free:
            self._grow(entry, forced=False)
        if not self.free:
            victim = next((p for p in self.where if p not in protect and p not in self.pinned), None)
            if victim is not None:
                self.metrics.slot_evictions.labels(self.key).inc()
                return self.where.pop(victim)
            self._grow(entry, forced=True)  # every slot is needed by this batch or pinned
        return self.free.pop()

    def _grow(self, entry: Entry, forced: bool) -> None:
        old = self.bank.capacity
        per_slot = self.bank.slot_bytes(entry.path_manifest.config)
        wanted = max(self.min_slots, 2 * old) - old
        extra = wanted if forced else min(wanted, max(0, self.room()) // per_slot)
        if extra <= 0:
            return
        if forced:
            log.warning("bank %s grows past the cache budget: %d slots needed at once", self.key, old + 1)
        self.bank.grow(old + extra)
        trim_heap()  # the smaller tables the bank just dropped
        self.free = sorted([*self.free, *range(old, old + extra)], reverse=True)

    def drop(self, path_id: str) -> None:
        with self.lock:
            slot = self.where.pop(path_id, None)
            if slot is not None:
                self.free = sorted([*self.free, slot], reverse=True)


def trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim): without it, the tables a bank
    drops when it grows stay in the process's resident memory. A no-op elsewhere."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PathCache:
    """The path memory of one worker, bounded in bytes: bank slots and materialized modules share
    ``budget`` (device memory); decoded tensors of slot-served paths share ``host_budget``. A cold
    path is read from the store once even when many requests for it arrive together. Pinned paths
    are never evicted."""

    def __init__(
        self,
        store: Store,
        zoo: ResidentZoo,
        budget: int,
        metrics: Metrics,
        pinned: frozenset[str] = frozenset(),
        host_budget: int = 512 * 2**20,
        batching: Literal["base", "path"] = "base",
        min_slots: int = 64,
    ):
        self.store, self.zoo, self.budget, self.metrics = store, zoo, budget, metrics
        self.pinned, self.host_budget, self.batching, self.min_slots = pinned, host_budget, batching, min_slots
        self.modules = ByteLRU()  # materialized paths
        self.host = ByteLRU()  # decoded tensors of paths served from bank slots
        self.tables: dict[str, SlotTable] = {}
        self._lock = threading.Lock()
        self._building: dict[str, threading.Lock] = {}  # one load per cold path at a time
        self._evictions = 0  # evict() calls so far: a load that overlapped one is not kept
        self._prefetch = ThreadPoolExecutor(1, thread_name_prefix="zoo-prefetch")  # loads that a describe starts

    @property
    def entries(self) -> OrderedDict[str, Entry]:
        """Materialized modules, least recently used first."""
        return self.modules.entries

    @property
    def nbytes(self) -> int:
        """Device bytes: materialized modules plus every bank's slots."""
        return self.modules.nbytes + sum(t.bank.nbytes() for t in list(self.tables.values()))

    def peek(self, path_id: str) -> Entry | None:
        """The entry if it is loaded, without counting a use (for questions about a path, not predicts)."""
        with self._lock:
            return self.modules.entries.get(path_id) or self.host.entries.get(path_id)

    def manifest(self, path_id: str) -> Manifest:
        """A path's manifest, for the question a worker asks before its first predict of the path
        (no use counted). A path not loaded yet is read from the store and its load goes on in the
        background while the worker decodes the request: the predict finds it loaded, or joins it."""
        if (entry := self.peek(path_id)) is not None:
            return entry.path_manifest
        manifest = self.store.path_manifest(path_id)
        self._prefetch.submit(self._prefetched, path_id)
        return manifest

    def _prefetched(self, path_id: str) -> None:
        try:
            self.get(path_id)
        except ZooError as e:  # the predict that follows loads it again, and answers with the error
            log.debug("prefetch of %s failed: %s", path_id, e)
        except Exception:  # no one waits for this load: say what went wrong
            log.exception("prefetch of %s failed", path_id)

    def close(self) -> None:
        """Loads not started yet are dropped (the store is going away)."""
        self._prefetch.shutdown(wait=False, cancel_futures=True)

    def get(self, path_id: str) -> Entry:
        with self._lock:
            if (hit := self._hit(path_id)) is not None:
                return hit
            building = self._building.setdefault(path_id, threading.Lock())
        with building:
            with self._lock:
                if (hit := self._hit(path_id)) is not None:  # another request loaded it meanwhile
                    return hit
            self.metrics.cache_misses.inc()
            evictions = self._evictions
            try:
                entry = self._materialize(path_id)
            finally:
                with self._lock:
                    self._building.pop(path_id, None)
            with self._lock:
                if self._evictions == evictions:  # else the path may have been deleted after it was read
                    self._keep(entry)
            return entry

    def _hit(self, path_id: str) -> Entry | None:
        entry = self.modules.get(path_id) or self.host.get(path_id)
        if entry is not None:
            self.metrics.cache_hits.inc()
        return entry

    def _keep(self, entry: Entry) -> None:
        if entry.bank_key is not None:
            self.host.put(entry)
            self.host.evict_over(self.host_budget, self.pinned)
            self.metrics.host_bytes.set(self.host.nbytes)
        else:
            self.modules.put(entry)
            self.modules.evict_over(self.budget, self.pinned, extra=self.nbytes - self.modules.nbytes)
        self.metrics.cache_bytes.set(self.nbytes)

    def _materialize(self, path_id: str) -> Entry:
        bundle = decode_stored(self.store.path_bundle(path_id), path_id)
        m = bundle.manifest
        self.zoo.check_refs(m)
        method = get_method(m.method)
        key = method.bank_key(m.config) if self.batching == "base" else None
        if key is not None:
            nbytes = tensor_bytes(bundle.tensors.values())
            return Entry(path_id, m, nbytes, tensors=bundle.tensors, bank_key=key)
        module = method.materialize(m.config, bundle.tensors, self.zoo.nets_of(m)).eval()
        self.metrics.materializations.labels(m.method).inc()
        return Entry(path_id, m, delta_bytes(module, self.zoo.shared_ptrs(m)), module=module)

    def table(self, entry: Entry) -> SlotTable:
        """The slot table of an entry's bank, made (empty) on first use."""
        key = entry.bank_key
        assert key is not None
        with self._lock:
            if key not in self.tables:
                method = get_method(entry.path_manifest.method)
                bank = method.bank(entry.path_manifest.config, self.zoo.nets_of(entry.path_manifest))
                self.tables[key] = SlotTable(key, bank, self._room, self.pinned, self.metrics, self.min_slots)
            return self.tables[key]

    def _room(self) -> int:
        """Device bytes left in the budget, after freeing what the module LRU may give up."""
        with self._lock:
            banks = self.nbytes - self.modules.nbytes
            self.modules.evict_over(self.budget, self.pinned, extra=banks)
            return self.budget - self.nbytes

    def evict(self, path_id: str) -> None:
        with self._lock:
            self._evictions += 1
            self.modules.pop(path_id)
            self.host.pop(path_id)
            tables = list(self.tables.values())
        for t in tables:
            t.drop(path_id)
        self.metrics.cache_bytes.set(self.nbytes)
        self.metrics.host_bytes.set(self.host.nbytes)
