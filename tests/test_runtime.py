"""Runtime: lazy materialization, the byte-bounded LRU, and micro-batching of concurrent requests."""

from __future__ import annotations

import asyncio

import torch
from fastapi.testclient import TestClient

from tests.helpers import compose, reprogram_spec


def _paths(client: TestClient, n: int) -> list[str]:
    return [compose(client, reprogram_spec(seed=s))["path_id"] for s in range(n)]


def test_lazy_materialization_and_lru_budget(app_client: TestClient) -> None:
    svc = app_client.app.state.services
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


def test_concurrent_requests_share_forward_passes(app_client: TestClient) -> None:
    svc = app_client.app.state.services
    pid = _paths(app_client, 1)[0]
    entry = svc.cache.get(pid)
    svc.batcher.max_batch, svc.batcher.max_wait = 8, 0.05
    calls: list[int] = []
    forward = svc.batcher._forward

    def counting(e, xs):
        calls.append(sum(len(x) for x in xs))
        return forward(e, xs)

    svc.batcher._forward = counting
    xs = [torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(i)) for i in range(16)]

    async def burst() -> list[torch.Tensor]:
        return await asyncio.gather(*(svc.batcher.submit(pid, entry, x) for x in xs))

    outs = asyncio.run(burst())
    assert calls == [8, 8]  # 16 requests, two forward passes of the max batch size
    with torch.inference_mode():
        alone = [forward(entry, [x]) for x in xs]
    for a, b in zip(outs, alone, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_pinned_paths_stay_and_cold_paths_build_once(app_client: TestClient) -> None:
    import threading

    svc = app_client.app.state.services
    p1, p2, p3 = _paths(app_client, 3)
    one = svc.cache.get(p1).nbytes
    svc.cache.budget, svc.cache.pinned = one + one // 2, frozenset({p1})  # room for one path
    svc.cache.get(p2)
    svc.cache.get(p3)  # over budget: p2 goes, p1 is pinned although least recently used
    assert list(svc.cache.entries) == [p1, p3]

    svc.cache.entries.clear()
    built: list[str] = []
    materialize = svc.cache._materialize

    def slow(path_id: str):
        built.append(path_id)
        threading.Event().wait(0.2)  # long enough for every request to arrive while it builds
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


def test_pinned_paths_are_materialized_at_start(tmp_path, app_client: TestClient) -> None:
    from tests.conftest import make_settings, start_app

    pid = _paths(app_client, 1)[0]
    settings = app_client.app.state.services.settings
    pinned = make_settings(tmp_path / "second", database_url=settings.db_url, pinned_paths=[pid, "p_" + "0" * 32])
    pinned.data_dir.mkdir()
    (pinned.data_dir / "blobs").symlink_to(settings.blob_dir.resolve())
    client = start_app(pinned)  # the missing pinned path is logged, not fatal
    try:
        assert list(client.app.state.services.cache.entries) == [pid]
    finally:
        client.__exit__(None, None, None)
