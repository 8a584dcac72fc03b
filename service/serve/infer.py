"""The inference process of `zoo serve`: the whole app (resident zoo, path tiers, the inference
loop, jobs) on a Unix socket for the HTTP workers to pass requests through, and the device
channel beside it for their decoded tensors. Started, watched and restarted by the supervisor."""

from __future__ import annotations

import logging

import uvicorn

from service.api.app import create_app
from service.common.procs import die_with_supervisor
from zoo_store.core.settings import Settings


def main() -> None:
    die_with_supervisor()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    settings = Settings()
    assert settings.ipc_dir is not None, "started by `zoo serve`, which sets ZOO_IPC_DIR"
    uvicorn.run(create_app(settings), uds=str(settings.ipc_dir / "app.sock"), log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
