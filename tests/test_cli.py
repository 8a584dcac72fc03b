"""The CLI end to end against an in-process server: models, datasets, compose, predict, bundles."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from service import cli
from service.client import ZooClient
from tests.helpers import png_b64, reprogram_spec

runner = CliRunner()
pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the storage legs run elsewhere


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


def test_lists(zoo: TestClient) -> None:
    out = _run("models", "list")
    assert "res" in out and "vgg" in out and "resnet_s" in out
    assert "mnist-rotated" in _run("datasets", "list")
    assert json.loads(_run("models", "show", "res"))["arch"] == "resnet_s"


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
    assert "bytes" in _run("bundle", "export", path_id, "--out", str(bundle))
    assert zoo.delete(f"/v1/paths/{path_id}").status_code == 204
    assert path_id in _run("bundle", "import", str(bundle))
    assert _run("predict", path_id, str(image), "--top-k", "2") == before


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
