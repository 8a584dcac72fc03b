"""Serving runtime: the resident zoo, the path memory (slots, host tier, modules) and the batcher.

A path is served one of two ways. If its method has a bank (reprogram), its decoded tensors sit in
a host-memory tier and, when a batch needs it, in a slot of its base's bank: one forward serves a
batch that mixes many such paths. Otherwise it is materialized as its own module (kept in an LRU)
and batched with requests for the same path only. Both share the cache's byte budget; the
database is beneath both.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from service.common.metrics import Metrics
from zoo_store.archs import TapNet
from zoo_store.core.cards import Card
from zoo_store.core.errors import Conflict, InvalidInput, NotFound, Overloaded, ZooError
from zoo_store.methods.bank import PathBank
from zoo_store.methods import get_method
from zoo_store.core.bundle import Bundle, Manifest, check_expected, decode_stored
from zoo_store.store.store import Store
from zoo_store.training import normalize
from zoo_store.core.weights import digest_of

log = logging.getLogger("zoo")


class ResidentZoo:
    """Every base this worker serves, loaded once, frozen, in eval mode; the networks are never
    written to. ``bases`` is replaced, never changed in place, so readers may iterate it unlocked."""

    def __init__(self, store: Store, device: str):
        self.store = store
        self.device = device
        self.bases: dict[str, tuple[Card, TapNet]] = {}
        self._ptrs: dict[str, frozenset[int]] = {}  # per base: the storage of its tensors (bases never change)
        self.unloadable: set[str] = set()  # bases ``follow`` failed to load (e.g. an architecture unknown here)
        self._lock = threading.Lock()

    def load_all(self) -> None:
        for card in self.store.cards().values():
            self.add(card)

    def add(self, card: Card) -> None:
        if card.id in self.bases:
            return
        net = self.store.load_base(card, self.device)  # outside the lock: other bases stay reachable meanwhile
        with self._lock:
            if card.id not in self.bases:
                self.bases = {**self.bases, card.id: (card, net)}

    @property
    def version(self) -> int:
        """The zoo version this process has: the bases it holds (see ``Store.zoo_version``)."""
        return len(self.bases)

    def follow(self) -> list[str]:
        """Load the bases registered (through any process) since this one last looked; the ids of
        those it loaded. One that fails to load is logged and skipped: it cannot hold up the rest."""
        if self.store.zoo_version() == self.version + len(self.unloadable):
            return []
        loaded = []
        for card in self.store.cards().values():
            if card.id in self.bases or card.id in self.unloadable:
                continue
            try:
                self.add(card)
                loaded.append(card.id)
            except Exception:
                self.unloadable.add(card.id)  # said once; a path that needs it gets the error on its request
                log.exception("base %s could not be loaded; skipped", card.id)
        return loaded

    def nets(self) -> dict[str, TapNet]:
        return {k: net for k, (_, net) in self.bases.items()}

    def nets_of(self, manifest: Manifest) -> dict[str, TapNet]:
        """Only the bases a path references (and ``check_refs`` verified): its config may name no other."""
        return {r.id: self.bases[r.id][1] for r in manifest.bases}

    def shared_ptrs(self, manifest: Manifest) -> set[int]:
        """Data pointers of the tensors of the bases a path references: what its module shares, not adds."""
        for r in manifest.bases:
            if r.id not in self._ptrs:
                net = self.bases[r.id][1]
                self._ptrs[r.id] = frozenset(t.data_ptr() for t in [*net.parameters(), *net.buffers()])
        return set().union(*(self._ptrs[r.id] for r in manifest.bases))

    def digests(self) -> dict[str, str]:
        """Recomputed from the resident tensors: proof that nothing wrote to them."""
        return {k: digest_of(net) for k, (_, net) in self.bases.items()}

    def check_refs(self, manifest: Manifest) -> None:
        """Every base a path needs is resident with its digest; one registered since this process
        started (through another replica) is loaded from the store first."""
        for ref in manifest.bases:
            if ref.id not in self.bases:
                try:
                    self.add(self.store.card(ref.id))
                except NotFound:
                    raise Conflict(f"path needs base {ref.id!r} (digest {ref.digest[:12]}…), which this zoo lacks") from None
            have = self.bases[ref.id][0].digest
            if have != ref.digest:
                raise Conflict(f"path needs base {ref.id!r} with digest {ref.digest[:12]}…; this zoo has {have[:12]}…")


def validate_bundle(bundle: Bundle, zoo: ResidentZoo) -> nn.Module:
    """Everything an import checks beyond the bundle's own digest; returns the built module."""
    m = bundle.manifest
    method = get_method(m.method)
    zoo.check_refs(m)
    for ref in m.bases:
        card = zoo.bases[ref.id][0]
        if m.input != card.input:
            raise InvalidInput(f"path input spec {m.input.model_dump()} differs from base {card.id!r}'s {card.input.model_dump()}")
    method.check_input(m.config, m.input)
    nets = zoo.nets_of(m)
    check_expected(m, method.expected_tensors(m.config, nets))
    module = method.materialize(m.config, bundle.tensors, nets)
    with torch.inference_mode():
        x = torch.zeros(1, m.input.channels, m.input.size, m.input.size, device=zoo.device)
        out = module(x)
    if tuple(out.shape) != (1, len(m.labels)):
        raise InvalidInput(f"path produces {tuple(out.shape[1:])} outputs for {len(m.labels)} labels")
    return module


@dataclass
class Entry:
    """A path ready to serve: its own module, or its decoded tensors for a slot of bank ``bank_key``."""

    path_id: str
    manifest: Manifest
    nbytes: int  # what it holds: the module's delta over the bases, or its decoded tensors
    module: nn.Module | None = None
    tensors: dict[str, torch.Tensor] | None = None
    bank_key: str | None = None

    @property
    def group(self) -> str:
        """What its requests are batched with: every path of its bank, or only itself."""
        return self.bank_key or self.path_id


def delta_bytes(module: nn.Module, shared: set[int]) -> int:
    """Bytes a materialized path adds on top of the resident bases."""
    tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(t.numel() * t.element_size() for k, t in tensors.items() if t.data_ptr() not in shared)


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

    def __init__(self, key: str, bank: PathBank, room: Callable[[], int], pinned: frozenset[str], metrics: Metrics,
                 min_slots: int):  # fmt: skip
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
                self.bank.load(slot, entry.manifest.config, entry.tensors or {})
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
        per_slot = self.bank.slot_bytes(entry.manifest.config)
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
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PathCache:
    """The path memory of one worker, bounded in bytes: bank slots and materialized modules share
    ``budget`` (device memory); decoded tensors of slot-served paths share ``host_budget``. A cold
    path is read from the store once even when many requests for it arrive together. Pinned paths
    are never evicted."""

    def __init__(self, store: Store, zoo: ResidentZoo, budget: int, metrics: Metrics,
                 pinned: frozenset[str] = frozenset(), host_budget: int = 512 * 2**20,
                 batching: Literal["base", "path"] = "base", min_slots: int = 64):  # fmt: skip
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
            return entry.manifest
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
            nbytes = sum(t.numel() * t.element_size() for t in bundle.tensors.values())
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
                method = get_method(entry.manifest.method)
                bank = method.bank(entry.manifest.config, self.zoo.nets_of(entry.manifest))
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


@dataclass
class _Request:
    entry: Entry
    x: torch.Tensor  # (n, C, H, W) in [0, 1]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    arrived: float


@dataclass
class _Group:
    requests: deque[_Request] = field(default_factory=deque)
    count: int = 0  # inputs pending
    oldest: float = math.inf  # the earliest arrival among them (requests join in submit order, not arrival order)


class Batcher:
    """The inference loop: one thread owns the device and runs every forward pass.

    Pending requests are grouped by bank (a batch then mixes every path of one base) or, for
    methods without one, by path. The group holding the oldest request goes next, as soon as it
    has ``max_batch_size`` inputs or that request has waited ``max_wait_ms``; under load a batch
    takes whatever arrived while the previous one ran, so no group starves."""

    def __init__(self, device: str, max_batch_size: int, max_wait_ms: float, metrics: Metrics, cache: PathCache,
                 max_queue: int = 2048):  # fmt: skip
        self.device, self.max_batch, self.max_wait = device, max_batch_size, max_wait_ms / 1000
        self.metrics, self.cache, self.max_queue = metrics, cache, max_queue
        self.groups: dict[str, _Group] = {}
        self.queued = 0  # inputs waiting for a batch
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def check_room(self, n: int = 1) -> None:
        """Refuse at once (503 with Retry-After) when ``n`` more inputs would overfill the queue."""
        if self.queued + n > self.max_queue:
            self.metrics.overloaded.inc()
            raise Overloaded(f"{self.queued} inputs are waiting for the device and {n} more would pass the limit of "
                             f"{self.max_queue} (ZOO_MAX_QUEUE_INPUTS); retry shortly", retry_after=1)  # fmt: skip

    async def submit(self, entry: Entry, x: torch.Tensor, arrived: float | None = None) -> torch.Tensor:
        """x: (n, C, H, W) in [0, 1] -> probabilities (n, K), batched with other requests. The batch
        wait counts from ``arrived`` (the request's ``time.monotonic()`` on arrival; now when None):
        a lone request's wait for company is spent on its path's load and input decoding first."""
        loop = asyncio.get_running_loop()
        request = _Request(entry, x, loop, loop.create_future(), time.monotonic() if arrived is None else arrived)
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self.check_room(len(x))
            self.queued += len(x)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="zoo-infer", daemon=True)
                self._thread.start()
            group = self.groups.setdefault(entry.group, _Group())
            group.requests.append(request)
            group.count += len(x)
            group.oldest = min(group.oldest, request.arrived)
            self._cond.notify()
        return await request.future

    def _next_batch(self) -> list[_Request] | None:
        with self._cond:
            while not self._closed:
                if not self.groups:
                    self._cond.wait()
                    continue
                key, group = min(self.groups.items(), key=lambda kv: kv[1].oldest)
                wait = group.oldest + self.max_wait - time.monotonic()
                if group.count >= self.max_batch or wait <= 0:
                    return self._take(key, group)
                self._cond.wait(wait)
            return None

    def _take(self, key: str, group: _Group) -> list[_Request]:
        """Whole requests up to max_batch_size inputs (at least one request)."""
        batch, n = [], 0
        while group.requests and (not batch or n + len(group.requests[0].x) <= self.max_batch):
            request = group.requests.popleft()
            batch.append(request)
            n += len(request.x)
        group.count -= n
        self.queued -= n
        if not group.requests:
            del self.groups[key]
        else:
            group.oldest = min(r.arrived for r in group.requests)
        return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                with torch.inference_mode():
                    outs = self._forward(batch)
            except Exception as e:  # noqa: BLE001  (reaches every waiter of the batch)
                for r in batch:
                    r.loop.call_soon_threadsafe(_settle, r.future, None, e)
                continue
            for r, out in zip(batch, outs, strict=True):
                r.loop.call_soon_threadsafe(_settle, r.future, out, None)

    def _forward(self, batch: list[_Request]) -> list[torch.Tensor]:
        """One forward pass for a batch of one group -> each request's probabilities (n, K)."""
        first = batch[0].entry
        x = torch.cat([r.x for r in batch]).to(self.device)  # (B, C, H, W)
        x = normalize(x, first.manifest.input)  # every path of a bank has its base's input spec
        self.metrics.batch_size.observe(len(x))
        self.metrics.paths_per_batch.observe(len({r.entry.path_id for r in batch}))
        if first.bank_key is None:
            assert first.module is not None
            probs = first.module(x).softmax(-1).float().cpu()  # (B, K)
        else:
            table = self.cache.table(first)
            slots = table.assign([r.entry for r in batch])
            per_input = torch.tensor([s for r, s in zip(batch, slots, strict=True) for _ in range(len(r.x))],
                                     device=x.device)  # (B,)  # fmt: skip
            probs = table.bank.forward(x, per_input).softmax(-1).float().cpu()  # (B, K_max)
        outs = torch.split(probs, [len(r.x) for r in batch])
        return [out[:, : len(r.entry.manifest.labels)] for r, out in zip(batch, outs, strict=True)]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            pending = [r for g in self.groups.values() for r in g.requests]
            self.groups.clear()
            self.queued = 0
        for r in pending:
            r.loop.call_soon_threadsafe(_settle, r.future, None, RuntimeError("the server is shutting down"))


def _settle(future: asyncio.Future, result: torch.Tensor | None, error: BaseException | None) -> None:
    if future.done():  # the request was cancelled (its client went away)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
