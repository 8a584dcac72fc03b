"""The device channel between HTTP workers and the inference process: tensors through the shared-
memory arena or inline, scores back unchanged, errors raised again as the same ZooError."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from service.api.device import DeviceOps
from service.serve.channel import Arena, DeviceClient, DeviceServer
from tests.conftest import on_sqlite
from tests.helpers import compose, reprogram_spec
from zoo_store.core.errors import InvalidInput, NotFound, Unauthorized


@on_sqlite()  # the storage legs run elsewhere
def test_predict_describe_and_errors_over_the_channel(app_client: TestClient, tmp_path: Path) -> None:
    svc = app_client.app.state.services
    pid = compose(app_client, reprogram_spec())["path_id"]
    admin = app_client.headers["authorization"].removeprefix("Bearer ")
    _, other = svc.auth.keys.create("other")  # a tenant that neither owns nor was granted the path
    entry = svc.cache.get(pid)
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))  # (N, C, H, W)

    async def go() -> None:
        server = DeviceServer(DeviceOps(svc), tmp_path / "device.sock")
        await server.start()
        arena = Arena(slot_bytes=28 * 28 * 4, slots=1)  # one image fits a slot; two travel inline
        client = DeviceClient(tmp_path / "device.sock", arena)
        try:
            info = await client.describe(pid, admin)
            assert info["labels"] == list(entry.manifest.labels) and info["input"]["size"] == 28
            want = await svc.batcher.submit(entry, x)  # (2, K)
            one = await client.predict(pid, x[:1].numpy(), admin)  # through the arena
            two = await client.predict(pid, x.numpy(), admin)  # inline: larger than a slot
            np.testing.assert_allclose(one, want[:1].numpy(), atol=1e-6, rtol=0)
            np.testing.assert_allclose(two, want.numpy(), atol=1e-6, rtol=0)
            assert arena.free == [0]  # the slot is handed back after the answer
            got, path = await client.predict_described(pid, x[:1].numpy(), admin)  # a first predict: one round trip
            np.testing.assert_allclose(got, want[:1].numpy(), atol=1e-6, rtol=0)
            assert path == info
            with pytest.raises(InvalidInput, match=r"has shape \[1, 1, 27, 28\], expected \[N, 1, 28, 28\]"):
                await client.predict_described(pid, x[:1, :, 1:].numpy(), admin)  # C, H, W checked there
            with pytest.raises(Unauthorized):
                await client.predict_described(pid, x[:1].numpy(), admin + "x")
            with pytest.raises(NotFound, match="no path"):
                await client.predict("p_" + "0" * 32, x[:1].numpy(), admin)
            for op in (client.describe(pid, None), client.predict(pid, x[:1].numpy(), admin + "x")):
                with pytest.raises(Unauthorized):  # the request's key is checked in the inference process
                    await op
            with pytest.raises(NotFound, match="no path"):  # another tenant's path: not revealed
                await client.predict(pid, x[:1].numpy(), other)
            assert arena.free == [0]
        finally:
            arena.close()
            await server.stop()

    asyncio.run(go())
