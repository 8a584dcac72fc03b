"""The CLI end to end against an in-process server: models, datasets, compose, predict, bundles."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from service import cli
from service.client import ZooClient
from tests.conftest import on_sqlite
from tests.helpers import png_b64, reprogram_spec

runner = CliRunner()


@pytest.fixture
def zoo(app_client: TestClient, monkeypatch: pytest.MonkeyPatch) -> TestClient:
    """Every CLI command talks to the test app (a TestClient is an httpx.Client)."""

    def client(url: str) -> ZooClient:
        c = ZooClient(url)
        c.http = app_client
        return c

    monkeypatch.setattr(cli, "_client", client)
    return app_client


def _run(*args: str) -> str:
    r = runner.invoke(cli.app, list(args), env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    return r.output


@on_sqlite()  # the storage legs run elsewhere
def test_lists(zoo: TestClient) -> None:
    out = _run("models", "list")
    assert "res" in out and "vgg" in out and "resnet_s" in out
    assert "mnist-rotated" in _run("datasets", "list")
    assert json.loads(_run("models", "show", "res"))["arch"] == "resnet_s"


@on_sqlite()  # the storage legs run elsewhere
def test_compose_predict_and_bundle_round_trip(zoo: TestClient, tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(reprogram_spec()))
    out = _run("compose", str(spec))
    path_id = next(w for w in out.split() if w.startswith("p_"))
    image = tmp_path / "digit.png"
    image.write_bytes(base64.b64decode(png_b64()))
    before = _run("predict", path_id, str(image), "--top-k", "2")
    assert before.startswith(f"{image}: ") and before.count("(") == 2

    bundle = tmp_path / "p.zoopath"
    assert "KB)" in _run("bundle", "export", path_id, "--out", str(bundle))
    assert "No such file or directory" in _mistake("bundle", "export", path_id, "--out", str(tmp_path / "no" / "x"))
    assert path_id in _run("paths", "list") and json.loads(_run("paths", "list", "--json"))[0]["id"] == path_id
    assert json.loads(_run("paths", "show", path_id))["method"] == "reprogram"
    assert _run("paths", "delete", path_id) == f"deleted {path_id}\n"
    assert _run("paths", "list", "--json").strip() == "[]"
    assert _run("bundle", "import", str(bundle)).startswith(f"imported: path {path_id} (reprogram, ")
    assert _run("bundle", "import", str(bundle)).startswith(f"already here: path {path_id}")  # the server's 200
    assert _run("predict", path_id, str(image), "--top-k", "2") == before

    jobs = json.loads(_run("jobs", "list", "--json"))
    assert [j["path_id"] for j in jobs] == [path_id] and "100.00%" in _run("jobs", "list", "--state", "succeeded")
    assert json.loads(_run("jobs", "show", jobs[0]["id"]))["state"] == "succeeded"
    assert f"path {path_id}  accuracy " in _run("jobs", "watch", jobs[0]["id"])  # an ended job: its result at once
    assert _run("jobs", "cancel", jobs[0]["id"]) == f"job {jobs[0]['id']}: succeeded\n"  # ended: as it was
    assert _run("jobs", "delete", jobs[0]["id"]) == f"deleted job {jobs[0]['id']}\n"
    assert _run("jobs", "list", "--json").strip() == "[]" and path_id in _run("paths", "list")  # path stays
    assert "%" in out.splitlines()[-1]  # accuracy for people, not 0.9244999885559082


@on_sqlite()  # the storage legs run elsewhere
def test_errors_are_one_line(zoo: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = runner.invoke(cli.app, ["models", "show", "nope"])
    assert r.exit_code == 1 and "error 404" in r.output and "nope" in r.output
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(reprogram_spec(base="nope")))
    r = runner.invoke(cli.app, ["compose", str(spec)])
    assert r.exit_code == 1 and "error 422" in r.output and "unknown base" in r.output
    monkeypatch.setattr(cli, "_client", ZooClient)  # a real client, nothing listening
    r = runner.invoke(cli.app, ["models", "list", "--url", "http://127.0.0.1:9"])
    assert r.exit_code == 1 and "cannot reach http://127.0.0.1:9" in r.output and "Traceback" not in r.output


def _mistake(*args: str) -> str:
    r = runner.invoke(cli.app, list(args), env={"COLUMNS": "80"})
    assert r.exit_code == 2, r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output, r.output
    return r.output


@on_sqlite()  # the storage legs run elsewhere
def test_local_mistakes_are_one_line_and_exit_2(zoo: TestClient, tmp_path: Path) -> None:
    assert "nope.png: No such file or directory" in _mistake("predict", "p_" + "0" * 32, str(tmp_path / "nope.png"))
    assert "nope.json: No such file or directory" in _mistake("compose", str(tmp_path / "nope.json"))
    bad = tmp_path / "spec.json"
    bad.write_text('{"method": "reprogram",')
    assert "spec.json is not JSON: Expecting property name" in _mistake("compose", str(bad))
    binary = tmp_path / "card.json"
    binary.write_bytes(b"\xff\xfe\x00")
    assert "card.json is not a text file" in _mistake("models", "add", str(binary), str(tmp_path / "w.safetensors"))
    assert "Is a directory" in _mistake("bundle", "import", str(tmp_path))
    r = runner.invoke(cli.app, ["bundle", "export", "p_" + "0" * 32])
    assert r.exit_code == 1 and "error 404" in r.output  # a server-side mistake: exit 1


def test_every_command_and_option_has_help() -> None:
    import typer.main

    group = typer.main.get_command(cli.app)
    missing = []

    def walk(cmd, name: str) -> None:
        if not (cmd.help or "").strip() or (cmd.help or "").strip() in {name.split()[-1], f"zoo {name.split()[-1]}"}:
            missing.append(name)
        for p in cmd.params:
            if getattr(p, "help", None) is not None and not p.help.strip():
                missing.append(f"{name} {p.name}")
            if p.param_type_name in ("option", "argument") and not getattr(p, "help", None) and p.name != "help":
                missing.append(f"{name} {p.name}")
        for sub_name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{name} {sub_name}")

    walk(group, "zoo")
    assert missing == []


@on_sqlite()  # the storage legs run elsewhere
def test_models_add_registers_a_torchvision_network_saved_in_plain_pytorch(zoo: TestClient, tmp_path: Path) -> None:
    """`zoo models add card.json weights.pth` with the file as torch.save wrote it (the CLI hands the
    client an open file, which httpx streams; through a TestClient only the registration is checked)."""
    import torch
    import torchvision

    weights = tmp_path / "finetuned.pth"
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=3).state_dict(), weights)
    card = tmp_path / "card.json"
    card.write_text(
        json.dumps(
            {
                "id": "mine",
                "arch": "torchvision:mobilenet_v3_small",
                "labels": ["a", "b", "c"],
                "input": {"channels": 3, "size": 64, "mean": [0.5] * 3, "std": [0.25] * 3},
            }
        )
    )
    assert "added: mine digest" in _run("models", "add", str(card), str(weights))
    assert "already there (same weights)" in _run("models", "add", str(card), str(weights))
    assert json.loads(_run("models", "show", "mine"))["arch"] == "torchvision:mobilenet_v3_small"


@pytest.mark.redis
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the storage legs run elsewhere
def test_worker_runs_jobs_with_only_a_store_a_queue_and_a_runner(
    db_url: str, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`zoo worker` (jobs in threads here, so with the bases resident) runs a job from the stream,
    and builds none of the app's services (path cache, batcher, auth, quotas)."""
    import os
    import signal
    import threading
    import time
    import uuid

    from service.api.state import Services
    from service.jobs.queues import RedisQueue
    from service.runtime.batcher import Batcher
    from service.runtime.cache import PathCache
    from tests.conftest import tiny_card, tiny_weights
    from zoo_store.store.blobs import DbBlobStore
    from zoo_store.store.db import Database
    from zoo_store.store.store import TERMINAL, Store

    stream = f"zoo:test:{uuid.uuid4().hex}"
    env = {
        "ZOO_DATABASE_URL": db_url,
        "ZOO_REDIS_URL": redis_url,
        "ZOO_JOBS_STREAM": stream,
        "ZOO_DATA_DIR": str(tmp_path),
        "ZOO_JOB_EXECUTOR": "thread",
        "ZOO_DEVICE": "cpu",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)

    def refused(*args, **kwargs):
        raise AssertionError("zoo worker built a service it does not need")

    monkeypatch.setattr(Services, "create", refused)
    for cls in (PathCache, Batcher):
        monkeypatch.setattr(cls, "__init__", refused)
    db = Database(db_url)
    db.migrate()
    store = Store(db, DbBlobStore(db))  # distributed mode: blobs in the database
    store.ensure_builtin_datasets()
    store.add_base(tiny_card("res"), tiny_weights("resnet_s", 10))
    jobs, before = [], signal.getsignal(signal.SIGTERM)

    def then_sigterm() -> None:  # once the worker is up: one job, then SIGTERM to this process (its handler)
        end = time.monotonic() + 120
        while signal.getsignal(signal.SIGTERM) is before and time.monotonic() < end:
            time.sleep(0.05)
        jobs.append(store.create_job(reprogram_spec()).id)
        RedisQueue(redis_url, stream=stream).put(jobs[0])
        while store.job(jobs[0]).state not in TERMINAL and time.monotonic() < end:
            time.sleep(0.05)
        if signal.getsignal(signal.SIGTERM) is not before:  # the worker's handler: never this test's own end
            os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=then_sigterm, daemon=True)
    sender.start()
    try:
        out = runner.invoke(cli.app, ["worker"], env={"COLUMNS": "200"})
        sender.join(5)
        assert out.exit_code == 0, out.output
        assert f"stream {stream}" in out.output and "worker: stopped" in out.output
        assert signal.getsignal(signal.SIGTERM) is before  # the worker's handlers are gone with it
        job = store.job(jobs[0])
        assert job.state == "succeeded" and store.path_exists(job.path_id), job.error
    finally:
        RedisQueue(redis_url, stream=stream).r.delete(stream, f"{stream}:epoch")
        db.dispose()


@on_sqlite()
def test_dashboard_opens_a_one_time_sign_in_link(zoo: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    monkeypatch.setattr(cli.webbrowser, "open", lambda url: opened.append(url) or True)
    assert "open in your browser" in _run("dashboard", "--url", "http://127.0.0.1:8000")
    printed = re.search(r"http://127\.0\.0\.1:8000/#token=(\S+)", _run("dashboard", "--no-open"))
    page = Path(opened[0].removeprefix("file://"))  # the token is never on a browser's command line
    assert printed and len(opened) == 1 and page.stat().st_mode & 0o077 == 0
    sent = re.search(r'url=http://127\.0\.0\.1:8000/#token=([\w-]+)"', page.read_text())
    for token in (sent.group(1), printed.group(1)):
        assert zoo.post("/v1/keys/exchange", json={"token": token}).status_code == 201
        assert zoo.post("/v1/keys/exchange", json={"token": token}).status_code == 401


@pytest.mark.parametrize(("status", "code"), [(200, 0), (503, 1), (None, 1)])
def test_healthcheck_is_readyz_of_the_local_port(status: int | None, code: int) -> None:
    """The image's HEALTHCHECK: 0 when /readyz on ZOO_PORT answers 200; 1 when it answers else or nothing listens."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Ready(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status if self.path == "/readyz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Ready)
    port = server.server_port
    if status is None:
        server.server_close()  # nothing listens there now
    else:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = runner.invoke(cli.app, ["healthcheck"], env={"ZOO_PORT": str(port)})
    finally:
        if status is not None:
            server.shutdown()
            server.server_close()
    assert r.exit_code == code, r.output
    if code:
        assert "not ready" in r.output
