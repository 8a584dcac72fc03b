"""Serving runtime: the resident zoo, the LRU of materialized paths and the micro-batcher."""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

from service.metrics import Metrics
from zoo_store.archs import TapNet
from zoo_store.cards import Card
from zoo_store.errors import Conflict, InvalidInput
from zoo_store.methods.registry import get_method
from zoo_store.paths import Bundle, Manifest, check_expected
from zoo_store.store import Store
from zoo_store.training import normalize
from zoo_store.weights import digest_of


class ResidentZoo:
    """Every base this worker serves, loaded once, frozen, in eval mode; never written to."""

    def __init__(self, store: Store, device: str):
        self.store = store
        self.device = device
        self.bases: dict[str, tuple[Card, TapNet]] = {}
        self._ptrs: dict[str, frozenset[int]] = {}  # per base: the storage of its tensors (bases never change)
        self._lock = threading.Lock()

    def load_all(self) -> None:
        for card in self.store.cards().values():
            self.add(card)

    def add(self, card: Card) -> None:
        with self._lock:
            if card.id not in self.bases:
                self.bases[card.id] = (card, self.store.load_base(card, self.device))

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
        for ref in manifest.bases:
            if ref.id not in self.bases:
                raise Conflict(f"path needs base {ref.id!r} (digest {ref.digest[:12]}…), which this server's zoo lacks")
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
    module: nn.Module
    manifest: Manifest
    nbytes: int


def delta_bytes(module: nn.Module, shared: set[int]) -> int:
    """Bytes a materialized path adds on top of the resident bases."""
    tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(t.numel() * t.element_size() for k, t in tensors.items() if t.data_ptr() not in shared)


class PathCache:
    """LRU of materialized paths bounded in bytes; lazily materialized on first use, once even when
    many requests for a cold path arrive together. Pinned paths are never evicted."""

    def __init__(self, store: Store, zoo: ResidentZoo, budget: int, metrics: Metrics, pinned: frozenset[str] = frozenset()):
        self.store, self.zoo, self.budget, self.metrics = store, zoo, budget, metrics
        self.pinned = pinned
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict[str, threading.Lock] = {}  # one materialization per cold path at a time

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def get(self, path_id: str) -> Entry:
        with self._lock:
            if (hit := self._hit(path_id)) is not None:
                return hit
            building = self._building.setdefault(path_id, threading.Lock())
        with building:
            with self._lock:
                if (hit := self._hit(path_id)) is not None:  # another request built it meanwhile
                    return hit
            self.metrics.cache_misses.inc()
            try:
                entry = self._materialize(path_id)
            finally:
                with self._lock:
                    self._building.pop(path_id, None)
            with self._lock:
                self.entries[path_id] = entry
                self._evict_over_budget()
                self.metrics.cache_bytes.set(self.nbytes)
            return entry

    def _hit(self, path_id: str) -> Entry | None:
        entry = self.entries.get(path_id)
        if entry is not None:
            self.entries.move_to_end(path_id)
            self.metrics.cache_hits.inc()
        return entry

    def _evict_over_budget(self) -> None:
        """Least recently used first, never a pinned path nor the one just used."""
        newest = next(reversed(self.entries))
        for path_id in [k for k in self.entries if k not in self.pinned and k != newest]:
            if self.nbytes <= self.budget:
                break
            del self.entries[path_id]

    def _materialize(self, path_id: str) -> Entry:
        from zoo_store.paths import decode_bundle

        bundle = decode_bundle(self.store.path(path_id).bundle)
        self.zoo.check_refs(bundle.manifest)
        module = get_method(bundle.manifest.method).materialize(bundle.manifest.config, bundle.tensors, self.zoo.nets_of(bundle.manifest))
        self.metrics.materializations.labels(bundle.manifest.method).inc()
        return Entry(module.eval(), bundle.manifest, delta_bytes(module, self.zoo.shared_ptrs(bundle.manifest)))

    def evict(self, path_id: str) -> None:
        with self._lock:
            self.entries.pop(path_id, None)
            self.metrics.cache_bytes.set(self.nbytes)


@dataclass
class _Pending:
    entry: Entry
    items: list[tuple[torch.Tensor, asyncio.Future]] = field(default_factory=list)
    count: int = 0
    timer: asyncio.TimerHandle | None = None


class Batcher:
    """Collects concurrent requests per path into one forward pass (max_batch_size, max_wait_ms)."""

    def __init__(self, device: str, max_batch_size: int, max_wait_ms: float, metrics: Metrics):
        self.device, self.max_batch, self.max_wait = device, max_batch_size, max_wait_ms / 1000
        self.metrics = metrics
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zoo-infer")
        self.pending: dict[str, _Pending] = {}

    async def submit(self, path_id: str, entry: Entry, x: torch.Tensor) -> torch.Tensor:
        """x: (n, C, H, W) in [0, 1] -> probabilities (n, K), batched with other requests for the path."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        p = self.pending.setdefault(path_id, _Pending(entry))
        p.items.append((x, fut))
        p.count += len(x)
        if p.count >= self.max_batch:
            self._flush(path_id)
        elif p.timer is None:
            p.timer = loop.call_later(self.max_wait, self._flush, path_id)
        return await fut

    def _flush(self, path_id: str) -> None:
        p = self.pending.pop(path_id, None)
        if p is None:
            return
        if p.timer:
            p.timer.cancel()
        loop = asyncio.get_running_loop()
        task = loop.run_in_executor(self.pool, self._forward, p.entry, [x for x, _ in p.items])
        task.add_done_callback(lambda t: self._resolve(t, p.items))

    @staticmethod
    def _resolve(task: asyncio.Future, items: list[tuple[torch.Tensor, asyncio.Future]]) -> None:
        if task.exception() is not None:
            for _, fut in items:
                if not fut.done():
                    fut.set_exception(task.exception())
            return
        outs = torch.split(task.result(), [len(x) for x, _ in items])
        for (_, fut), out in zip(items, outs, strict=True):
            if not fut.done():
                fut.set_result(out)

    def _forward(self, entry: Entry, xs: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(xs).to(self.device)  # (B, C, H, W)
        self.metrics.batch_size.observe(len(x))
        with torch.inference_mode():
            logits = entry.module(normalize(x, entry.manifest.input))  # (B, K)
        return logits.softmax(-1).float().cpu()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
