"""A bundle exported from one server and imported into a second one predicts identically."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient

from tests.conftest import make_settings, start_app
from tests.helpers import compose, png_b64, reprogram_spec, tensor_inputs


def _pull_bases(src: TestClient, dst: TestClient) -> None:
    """What `zoo models pull` does: fetch the public zoo's cards and weights from the first server."""
    keys = ("id", "arch", "arch_config", "labels", "input", "metrics", "description")
    for card in src.get("/v1/zoo/models").json()["items"]:
        weights = src.get(f"/v1/zoo/models/{card['id']}/weights").content
        r = dst.post("/v1/zoo/models", data={"card": json.dumps({k: card[k] for k in keys})},
                     files={"weights": ("w.safetensors", weights)})  # fmt: skip
        assert r.status_code == 201 and r.json()["digest"] == card["digest"]


def test_bundle_moves_between_servers(app_client: TestClient, tmp_path: Path) -> None:
    pid = compose(app_client, reprogram_spec(epochs=2))["path_id"]
    bundle = app_client.get(f"/v1/paths/{pid}/bundle").content
    inputs = tensor_inputs(4, seed=5) + [{"image": png_b64(seed=2)}]
    here = app_client.post(f"/v1/paths/{pid}/predict", json={"inputs": inputs, "top_k": 3}).json()

    second = start_app(make_settings(tmp_path / "second"))
    try:
        r = second.post("/v1/paths/import", content=bundle)
        assert r.status_code == 409 and "lacks" in r.json()["detail"]  # no bases yet: refused, nothing written
        assert second.get("/v1/paths").json()["items"] == []
        _pull_bases(app_client, second)
        r = second.post("/v1/paths/import", content=bundle)
        assert r.status_code == 201 and r.json()["id"] == pid
        there = second.post(f"/v1/paths/{pid}/predict", json={"inputs": inputs, "top_k": 3}).json()
        assert there == here
        assert second.get(f"/v1/paths/{pid}/bundle").content == bundle
    finally:
        second.__exit__(None, None, None)
