"""The inference process of `zoo serve`: the whole app (resident zoo, path tiers, the inference
loop, jobs) on a Unix socket for the HTTP workers to pass requests through, and the device
channel beside it for their decoded tensors. Started, watched and restarted by the supervisor."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI

from service.api.app import create_app
from service.api.device import DeviceOps
from service.api.state import Services
from service.common.procs import die_with_supervisor
from service.serve.channel import DeviceServer
from zoo_store.core.settings import Settings


def inference_app(settings: Settings) -> FastAPI:
    """The app, serving the device channel on ``settings.ipc_dir / "device.sock"`` while it runs."""
    assert settings.ipc_dir is not None, "started by `zoo serve`, which sets ZOO_IPC_DIR"
    socket_path = settings.ipc_dir / "device.sock"

    @asynccontextmanager
    async def device_channel(services: Services) -> AsyncIterator[None]:
        server = DeviceServer(DeviceOps(services), socket_path)
        await server.start()
        try:
            yield
        finally:
            await server.stop()

    return create_app(settings, beside=device_channel)


def main() -> None:
    die_with_supervisor()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    settings = Settings()
    assert settings.ipc_dir is not None, "started by `zoo serve`, which sets ZOO_IPC_DIR"
    app = inference_app(settings)
    uvicorn.run(app, uds=str(settings.ipc_dir / "app.sock"), log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
