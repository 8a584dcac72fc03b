"""The inference loop: requests queue per worker and are collected into batches grouped by base;
one forward serves a batch that mixes many paths of a bank, other paths are batched per path."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from service.common.metrics import Metrics
from service.runtime.cache import Entry, PathCache
from zoo_store.core.errors import Overloaded
from zoo_store.training import normalize

log = logging.getLogger("zoo")


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

    def __init__(
        self,
        device: str,
        max_batch_size: int,
        max_wait_ms: float,
        metrics: Metrics,
        cache: PathCache,
        max_queue: int = 2048,
    ):
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
            raise Overloaded(
                f"{self.queued} inputs are waiting for the device and {n} more would pass the limit of "
                f"{self.max_queue} (ZOO_MAX_QUEUE_INPUTS); retry shortly",
                retry_after=1,
            )

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
            self.metrics.queue_inputs.set(self.queued)
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
        self.metrics.queue_inputs.set(self.queued)
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
        x = normalize(x, first.input)  # every path of a bank has its base's input spec
        self.metrics.batch_size.observe(len(x))
        self.metrics.paths_per_batch.observe(len({r.entry.path_id for r in batch}))
        if first.bank_key is None:
            assert first.module is not None
            probs = first.module(x).softmax(-1).float().cpu()  # (B, K)
        else:
            table = self.cache.table(first)
            slots = table.assign([r.entry for r in batch])
            per_input = torch.tensor(
                [s for r, s in zip(batch, slots, strict=True) for _ in range(len(r.x))], device=x.device
            )  # (B,)
            probs = table.bank.forward(x, per_input).softmax(-1).float().cpu()  # (B, K_max)
        outs = torch.split(probs, [len(r.x) for r in batch])
        return [out[:, : len(r.entry.labels)] for r, out in zip(batch, outs, strict=True)]

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
