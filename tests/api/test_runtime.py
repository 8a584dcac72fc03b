"""Runtime: lazy loading, the byte-bounded tiers (modules, host tensors, bank slots), and the
inference loop that batches concurrent requests (mixing the paths of one base)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

from service.common.metrics import Metrics
from service.runtime.batcher import Batcher
from service.runtime.cache import Entry
from tests.helpers import compose, reprogram_spec
from zoo_store.core.bundle import decode_bundle
from zoo_store.core.cards import InputSpec
from zoo_store.core.errors import NotFound
from zoo_store.core.manifest import Manifest
from zoo_store.methods import get_method
from zoo_store.training import normalize


def _paths(client: TestClient, n: int) -> list[str]:
    return [compose(client, reprogram_spec(seed=s))["path_id"] for s in range(n)]


def _own_module(client: TestClient, pid: str) -> nn.Module:
    """The path's own per-path module, built from its stored bundle (the reference for its scores)."""
    svc = client.app.state.services
    b = decode_bundle(svc.store.path(pid).bundle)
    return get_method("reprogram").materialize(b.manifest.config, b.tensors, svc.zoo.nets_of(b.manifest)).eval()


def _x(seed: int, n: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))  # (n, C, H, W)


def test_module_lru_budget(app_client: TestClient) -> None:
    svc = app_client.app.state.services
    svc.cache.batching = "path"  # every path its own module
    p1, p2, p3 = _paths(app_client, 3)
    assert svc.cache.entries == {}  # nothing is materialized until a predict needs it
    one = svc.cache.get(p1).nbytes
    assert 0 < one < 200_000  # the delta only: the base weights are shared, not copied
    svc.cache.budget = 2 * one + one // 2  # room for two paths
    svc.cache.get(p2)
    svc.cache.get(p1)  # p1 is now the most recent
    svc.cache.get(p3)  # evicts p2, the least recently used
    assert list(svc.cache.entries) == [p1, p3]
    assert svc.cache.nbytes <= svc.cache.budget
    hits = svc.metrics.cache_hits._value.get()
    body = {"inputs": [{"tensor": torch.zeros(1, 28, 28).tolist()}]}
    assert app_client.post(f"/v1/paths/{p3}/predict", json=body).status_code == 200
    assert svc.metrics.cache_hits._value.get() == hits + 1
    assert app_client.post(f"/v1/paths/{p2}/predict", json=body).status_code == 200  # materialized again
    assert p2 in svc.cache.entries and p1 not in svc.cache.entries


def test_host_tier_and_slots_are_lrus(app_client: TestClient) -> None:
    svc = app_client.app.state.services
    p1, p2, p3 = _paths(app_client, 3)
    one = svc.cache.get(p1)
    assert one.module is None and one.bank_key == "reprogram:res:k3"  # no nn.Module per path
    assert one.nbytes == sum(t.numel() * t.element_size() for t in one.tensors.values())
    svc.cache.host_budget = 2 * one.nbytes + one.nbytes // 2  # room for two paths' tensors
    svc.cache.get(p2)
    svc.cache.get(p1)
    svc.cache.get(p3)  # evicts p2's tensors
    assert list(svc.cache.host.entries) == [p1, p3] and svc.cache.entries == {}

    svc.cache.min_slots = 2  # a bank of two slots, full: the third path takes the least recently used one
    svc.cache.budget = 10**9
    before = {p: asyncio.run(svc.batcher.submit(svc.cache.get(p), _x(0))) for p in (p1, p2)}
    table = svc.cache.tables["reprogram:res:k3"]
    assert table.bank.capacity == 2 and list(table.where) == [p1, p2]
    svc.cache.budget = svc.cache.nbytes  # no room to grow
    asyncio.run(svc.batcher.submit(svc.cache.get(p1), _x(0)))  # p1 is now the most recent
    asyncio.run(svc.batcher.submit(svc.cache.get(p3), _x(0)))  # reuses p2's slot
    assert list(table.where) == [p1, p3] and table.bank.capacity == 2
    assert svc.metrics.slot_evictions.labels(table.key)._value.get() == 1
    again = asyncio.run(svc.batcher.submit(svc.cache.get(p2), _x(0)))  # loaded again, into p1's slot
    assert torch.equal(again, before[p2])
    assert svc.metrics.slot_loads.labels(table.key)._value.get() == 4


def test_slots_grow_within_the_budget_only(app_client: TestClient) -> None:
    svc = app_client.app.state.services
    pids = _paths(app_client, 3)
    entries = [svc.cache.get(p) for p in pids]
    svc.cache.min_slots = 1
    table = svc.cache.table(entries[0])
    per_slot = table.bank.slot_bytes(entries[0].manifest.config)
    svc.cache.budget = per_slot + per_slot // 2  # room for one slot
    table.assign(entries[:1])
    table.assign(entries[1:2])  # no room to grow: p1's slot is reused
    assert table.bank.capacity == 1 and list(table.where) == [pids[1]]
    assert table.assign(entries[:2]) == [1, 0]  # a batch needing two slots grows past the budget
    assert table.bank.capacity == 2
    svc.cache.budget = 10**9
    table.assign(entries[2:])  # doubling
    assert table.bank.capacity == 4


def test_mixed_batches_share_forward_passes(app_client: TestClient) -> None:
    """16 requests over 4 paths of one base: two forward passes of 8, each sample scored as its own
    path's module scores it, and the same as when it runs alone."""
    svc = app_client.app.state.services
    pids = _paths(app_client, 4)
    entries = [svc.cache.get(p) for p in pids]
    svc.batcher.max_batch, svc.batcher.max_wait = 8, 0.5
    calls: list[tuple[int, int]] = []
    forward = svc.batcher._forward

    def counting(batch):
        calls.append((sum(len(r.x) for r in batch), len({r.entry.path_id for r in batch})))
        return forward(batch)

    svc.batcher._forward = counting
    xs = [_x(i) for i in range(16)]

    async def burst() -> list[torch.Tensor]:
        return await asyncio.gather(*(svc.batcher.submit(entries[i % 4], x) for i, x in enumerate(xs)))

    outs = asyncio.run(burst())
    assert calls == [(8, 4), (8, 4)]  # one forward mixes the four paths
    modules = [_own_module(app_client, p) for p in pids]
    for i, (x, out) in enumerate(zip(xs, outs, strict=True)):
        with torch.inference_mode():
            own = modules[i % 4](normalize(x, entries[0].manifest.input).to(svc.zoo.device)).softmax(-1).cpu()
        torch.testing.assert_close(out, own, atol=1e-5, rtol=0)
        alone = asyncio.run(svc.batcher.submit(entries[i % 4], x))
        torch.testing.assert_close(out, alone, atol=1e-6, rtol=0)


def test_pinned_paths_stay_and_cold_paths_load_once(app_client: TestClient) -> None:
    svc = app_client.app.state.services
    p1, p2, p3 = _paths(app_client, 3)
    one = svc.cache.get(p1).nbytes
    svc.cache.host_budget, svc.cache.pinned = one + one // 2, frozenset({p1})  # room for one path
    svc.cache.get(p2)
    svc.cache.get(p3)  # over budget: p2 goes, p1 is pinned although least recently used
    assert list(svc.cache.host.entries) == [p1, p3]

    svc.cache.host.entries.clear()
    built: list[str] = []
    materialize = svc.cache._materialize

    def slow(path_id: str):
        built.append(path_id)
        threading.Event().wait(0.2)  # long enough for every request to arrive while it loads
        return materialize(path_id)

    svc.cache._materialize = slow
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(svc.cache.get(p2))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert built == [p2] and len(got) == 4 and all(e is got[0] for e in got)
    assert svc.cache._building == {}


def test_a_describe_starts_the_load_that_its_predict_then_finds(app_client: TestClient) -> None:
    """The worker's describe before its first predict of a path answers from the manifest alone and
    leaves the load going; the predict joins it. A path deleted while it loads is not kept."""
    svc = app_client.app.state.services
    p1, p2 = _paths(app_client, 2)
    admin = app_client.headers["authorization"].removeprefix("Bearer ")
    read, gate, built = threading.Event(), threading.Event(), []
    materialize = svc.cache._materialize

    def gated(path_id: str):
        entry = materialize(path_id)  # the row is read
        built.append(path_id)
        read.set()
        gate.wait(10)
        return entry

    svc.cache._materialize = gated
    m = svc.describe(admin, p1)
    assert m == decode_bundle(svc.store.path(p1).bundle).manifest and svc.cache.peek(p1) is None  # before the load
    gate.set()
    entry = svc.cache.get(p1)  # joins the load the describe started (or finds it done)
    assert built == [p1] and svc.cache.peek(p1) is entry

    read.clear()
    gate.clear()
    svc.describe(admin, p2)
    assert read.wait(10)  # its row is read; the path is deleted before the load is kept
    assert app_client.delete(f"/v1/paths/{p2}").status_code == 204
    gate.set()
    svc.cache._prefetch.submit(lambda: None).result(10)  # the load has ended
    assert built == [p1, p2] and svc.cache.peek(p2) is None
    with pytest.raises(NotFound):
        svc.describe(admin, p2)


def test_pinned_paths_are_loaded_at_start(tmp_path, app_client: TestClient) -> None:
    from tests.conftest import make_settings, start_app

    pid = _paths(app_client, 1)[0]
    settings = app_client.app.state.services.settings
    pinned = make_settings(tmp_path / "second", database_url=settings.db_url, pinned_paths=[pid, "p_" + "0" * 32])
    pinned.data_dir.mkdir()
    (pinned.data_dir / "blobs").symlink_to(settings.blob_dir.resolve())
    client = start_app(pinned)  # the missing pinned path is logged, not fatal
    try:
        assert list(client.app.state.services.cache.host.entries) == [pid]
    finally:
        client.__exit__(None, None, None)


# -- the inference loop with fake paths -------------------------------------------------------


class _Scale(nn.Module):
    def __init__(self, k: float):
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :2] * self.k  # (B, 2)


def _entry(path_id: str, module: nn.Module) -> Entry:
    spec = InputSpec(channels=1, size=4, mean=(0.0,), std=(1.0,))
    manifest = Manifest(
        format="1",
        method="fake",
        bases=({"id": "b", "digest": "0" * 64},),
        labels=("a", "b"),
        input=spec,
        config={},
        tensors={},
        tensor_digest="0" * 64,
    )
    return Entry(path_id, manifest, 0, module=module)


def _batcher(max_batch: int, max_wait_ms: float) -> tuple[Batcher, list[list[str]]]:
    batcher = Batcher("cpu", max_batch, max_wait_ms, Metrics(), cache=None)  # type: ignore[arg-type]
    seen: list[list[str]] = []
    forward = batcher._forward
    batcher._forward = lambda batch: seen.append([r.entry.path_id for r in batch]) or forward(batch)
    return batcher, seen


def test_batch_flushes_on_size_and_on_timer() -> None:
    batcher, seen = _batcher(max_batch=4, max_wait_ms=200)
    e = _entry("p1", _Scale(1.0))

    async def go() -> tuple[float, float]:
        t = time.monotonic()
        await asyncio.gather(*(batcher.submit(e, torch.ones(1, 1, 4, 4)) for _ in range(4)))
        full = time.monotonic() - t
        t = time.monotonic()
        await batcher.submit(e, torch.ones(1, 1, 4, 4))
        return full, time.monotonic() - t

    full, lone = asyncio.run(go())
    assert seen == [["p1"] * 4, ["p1"]]
    assert full < 0.15 and 0.18 < lone < 1.0  # a full batch goes at once, a lone request after max_wait
    batcher.close()


def test_the_batch_wait_counts_from_arrival() -> None:
    """A request that spent its wait before reaching the queue (its path loading) goes at once."""
    batcher, seen = _batcher(max_batch=4, max_wait_ms=200)
    e = _entry("p1", _Scale(1.0))

    async def go(arrived_ago: float) -> float:
        t = time.monotonic()
        await batcher.submit(e, torch.ones(1, 1, 4, 4), arrived=t - arrived_ago)
        return time.monotonic() - t

    assert asyncio.run(go(0.25)) < 0.15  # its 200 ms are gone already
    assert asyncio.run(go(0.0)) > 0.18
    assert seen == [["p1"], ["p1"]]
    batcher.close()


def test_an_error_reaches_every_waiter_and_groups_take_turns() -> None:
    batcher, seen = _batcher(max_batch=8, max_wait_ms=50)
    good, bad = _entry("good", _Scale(2.0)), _entry("bad", _Scale(1.0))
    bad.module.forward = lambda x: (_ for _ in ()).throw(ValueError("boom"))  # type: ignore[union-attr]

    async def go() -> list:
        return await asyncio.gather(
            *(batcher.submit(bad if i % 2 else good, torch.ones(1, 1, 4, 4)) for i in range(6)), return_exceptions=True
        )

    outs = asyncio.run(go())
    assert [type(o).__name__ for o in outs] == ["Tensor", "ValueError"] * 3
    assert sorted(seen) == [["bad"] * 3, ["good"] * 3]  # one batch per group (no module shares a forward)
    torch.testing.assert_close(outs[0], torch.tensor([[2.0, 2.0]]).softmax(-1))
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(batcher.submit(good, torch.ones(1, 1, 4, 4)))


def test_a_full_queue_is_refused_at_once_and_recovers(app_client: TestClient) -> None:
    """Past ZOO_MAX_QUEUE_INPUTS a predict is a 503 with Retry-After, answered within 50 ms; once
    the queue drains, predicts succeed again."""
    svc = app_client.app.state.services
    pid = _paths(app_client, 1)[0]
    entry = svc.cache.get(pid)
    body = {"inputs": [{"tensor": torch.zeros(1, 28, 28).tolist()}]}
    assert app_client.post(f"/v1/paths/{pid}/predict", json=body).status_code == 200  # the server is warm
    svc.batcher.max_queue, svc.batcher.max_batch = 4, 1
    started, gate = threading.Event(), threading.Event()
    forward = svc.batcher._forward

    def stuck(batch):  # the device is stuck until the gate opens
        started.set()
        gate.wait(30)
        return forward(batch)

    svc.batcher._forward = stuck

    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()

    def submit(i: int):
        return asyncio.run_coroutine_threadsafe(svc.batcher.submit(entry, _x(i)), loop)

    def queued(n: int) -> None:
        end = time.monotonic() + 5
        while svc.batcher.queued != n and time.monotonic() < end:
            time.sleep(0.01)
        assert svc.batcher.queued == n

    waiting = [submit(0)]
    assert started.wait(5)  # the first request is in the stuck forward
    waiting += [submit(i) for i in range(1, 5)]
    queued(4)
    t = time.monotonic()
    r = app_client.post(f"/v1/paths/{pid}/predict", json=body)
    assert time.monotonic() - t < 0.05, (time.monotonic() - t, r.status_code, r.text)
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    assert "ZOO_MAX_QUEUE_INPUTS" in r.json()["detail"]
    gate.set()  # the load drops
    assert all(f.result(10).shape == (1, 3) for f in waiting)
    assert app_client.post(f"/v1/paths/{pid}/predict", json=body).status_code == 200
    loop.call_soon_threadsafe(loop.stop)
