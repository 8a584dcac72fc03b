"""Fixtures: tiny zoos, apps on both databases, and the real services' legs (fail loudly in CI)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from bench.common import scratch_database
from service.api.app import create_app
from service.serve.infer import inference_app
from zoo_store.archs import build_arch
from zoo_store.core.cards import CardIn, InputSpec
from zoo_store.core.settings import Settings

PG_URL = os.environ.get("ZOO_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("ZOO_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# worker counts the API tests run through (0: in process); CI runs in process and through 2
# (1 worker forwards as 2 do: `zoo serve --workers 1` has tests of its own in tests/system/test_serve.py)
HTTP_WORKERS = [int(w) for w in os.environ.get("ZOO_TEST_HTTP_WORKERS", "0,2" if IN_CI else "0").split(",")]
GRAY = InputSpec(channels=1, size=28, mean=(0.5,), std=(0.5,))


def _unreachable(what: str, err: Exception) -> None:
    if IN_CI:
        pytest.fail(f"{what} is unreachable in CI: {err}")
    pytest.skip(f"{what} unreachable here: {err}")


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database per session: we create and drop a database."""
    database = scratch_database(PG_URL, "zoo_test")
    try:
        url = database.__enter__()
    except Exception as e:  # noqa: BLE001
        _unreachable("PostgreSQL", e)
    yield url
    database.__exit__(None, None, None)


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL).ping()
    except Exception as e:  # noqa: BLE001
        _unreachable("Redis", e)
    return REDIS_URL


def tiny_card(base_id: str, arch: str = "resnet_s", labels: tuple[str, ...] = tuple("0123456789")) -> CardIn:
    return CardIn(id=base_id, arch=arch, labels=labels, input=GRAY, arch_config={})


def tiny_weights(arch: str, num_classes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random but non-trivial weights (BN statistics perturbed so eval mode is not the identity)."""
    torch.manual_seed(seed)
    net = build_arch(arch, {"num_classes": num_classes})
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net.state_dict()


def make_settings(tmp: Path, **kw) -> Settings:
    device = os.environ.get("ZOO_TEST_DEVICE", "cpu")  # the GPU machine runs the suite with cuda
    base = {"data_dir": tmp, "demo_zoo": False, "job_executor": "thread", "device": device, "max_wait_ms": 1.0}
    return Settings(**{**base, **kw})


def database_url(request, database: str, tmp_path: Path) -> str:
    """``sqlite``: a file in ``tmp_path``; ``postgres``: the session's PostgreSQL database, emptied."""
    if database == "sqlite":
        return f"sqlite:///{tmp_path / 'zoo.db'}"
    return request.getfixturevalue("pg_url_fresh")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path: Path) -> str:
    return database_url(request, request.param, tmp_path)


@pytest.fixture
def pg_url_fresh(pg_url: str) -> Iterator[str]:
    """The session's PostgreSQL database, emptied before each test."""
    eng = create_engine(pg_url)
    with eng.begin() as c:
        c.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    eng.dispose()
    yield pg_url


def start_app(settings: Settings) -> TestClient:
    """The app started, its client sending the admin key the first start wrote (auth is on in tests)."""
    client = TestClient(create_app(settings))
    client.__enter__()
    svc = client.app.state.services
    assert svc.ready.wait(120), svc.startup_error
    as_admin(client, settings)
    return client


def admin_key(settings: Settings) -> str | None:
    path = settings.data_dir / "admin.key"
    return path.read_text().strip() if path.exists() else None


def as_admin(client: httpx.Client, settings: Settings) -> None:
    if key := admin_key(settings):
        client.headers["Authorization"] = f"Bearer {key}"


class Front:
    """HTTP worker processes (``python -m service.serve.front``) on a loopback port, for a whole session:
    each test's app serves them from this process through the sockets in ``ipc``."""

    def __init__(self, ipc: Path, workers: int):
        self.ipc, self.workers = ipc, workers
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {**os.environ, "ZOO_IPC_DIR": str(ipc), "ZOO_DEMO_ZOO": "false"}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.serve.front", str(self.port), str(workers)], env=env
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


class FrontClient(httpx.Client):
    """Talks to the HTTP workers like a user; ``app`` is the app behind them, served from this
    process on the front's sockets (so tests can still reach its services)."""

    def __init__(self, settings: Settings, front: Front):
        super().__init__(base_url=front.url, timeout=120)
        self.app = inference_app(settings)
        (front.ipc / "app.sock").unlink(missing_ok=True)
        config = uvicorn.Config(self.app, uds=str(front.ipc / "app.sock"), log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        end = time.monotonic() + 60
        while not self.server.started and time.monotonic() < end:
            time.sleep(0.01)
        svc = self.app.state.services
        assert svc.ready.wait(120), svc.startup_error
        as_admin(self, settings)
        while time.monotonic() < end:  # the workers answer (they start once per session)
            try:
                if self.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        super().close()

    def __exit__(self, *exc) -> None:
        self.close()


@pytest.fixture(scope="session")
def fronts(tmp_path_factory) -> Iterator[dict[int, Front]]:
    started: dict[int, Front] = {}

    class Lazy(dict):
        def __missing__(self, workers: int) -> Front:
            started[workers] = self[workers] = Front(tmp_path_factory.mktemp(f"ipc{workers}"), workers)
            return started[workers]

    yield Lazy()
    for front in started.values():
        front.close()


def serving_client(request, workers: int, tmp: Path, **settings) -> TestClient | FrontClient:
    """The app on ``tmp`` (with ``settings``), started: in process (``workers`` 0) or behind that many
    HTTP worker processes, reached through them. The caller ``__exit__``s it."""
    if not workers:
        return start_app(make_settings(tmp, **settings))
    front = request.getfixturevalue("fronts")[workers]
    return FrontClient(make_settings(tmp, ipc_dir=front.ipc, **settings), front)


def _backends() -> list:
    """app_client's (database, HTTP workers): each database in process, and each worker count of
    ``HTTP_WORKERS`` in front of one database, alternating; not their full product. The workers only
    forward HTTP to the app and the database sits behind the app: the two layers meet nowhere else."""
    databases = ("sqlite", "postgres")
    pairs = [(db, 0) for db in databases] if 0 in HTTP_WORKERS else []
    pairs += [(databases[i % 2], w) for i, w in enumerate(w for w in HTTP_WORKERS if w)]
    marks = {"sqlite": [], "postgres": [pytest.mark.postgres]}
    return [pytest.param((db, w), id=f"{db}-workers{w}", marks=marks[db]) for db, w in pairs]


def on_sqlite() -> pytest.MarkDecorator:
    """app_client on SQLite only, in process and behind each worker count (tests whose storage legs run elsewhere)."""
    params = [pytest.param(("sqlite", w), id=f"sqlite-workers{w}") for w in HTTP_WORKERS]
    return pytest.mark.parametrize("app_client", params, indirect=True)


def in_process() -> pytest.MarkDecorator:
    """app_client on each database in process only: tests of a method's results, whose requests
    the HTTP workers would only forward (their forwarding has tests of its own)."""
    params = [pytest.param(("sqlite", 0), id="sqlite-workers0")]
    params.append(pytest.param(("postgres", 0), id="postgres-workers0", marks=pytest.mark.postgres))
    return pytest.mark.parametrize("app_client", params, indirect=True)


@pytest.fixture(params=_backends())
def app_client(tmp_path: Path, request) -> Iterator[TestClient]:
    """An app with two tiny random-weight bases, on SQLite and on PostgreSQL, reached directly or
    through ``ZOO_TEST_HTTP_WORKERS`` HTTP worker processes (see ``_backends``)."""
    database, workers = request.param
    client = serving_client(request, workers, tmp_path, database_url=database_url(request, database, tmp_path))
    store = client.app.state.services.store
    for base_id, arch in (("res", "resnet_s"), ("vgg", "vgg_s")):
        card, _ = store.add_base(tiny_card(base_id, arch), tiny_weights(arch, 10))
        client.app.state.services.zoo.add(card)
    yield client
    client.__exit__(None, None, None)
