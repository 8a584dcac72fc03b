"""A bundle exported from one server and imported into a second one predicts identically."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient

from tests.conftest import make_settings, start_app
from tests.helpers import compose, png_b64, reprogram_spec, tensor_inputs


def _pull_bases(src: TestClient, dst: TestClient) -> None:
    """What `zoo models pull` does: each card as the first server returns it, and its weights."""
    for card in src.get("/v1/zoo/models").json()["items"]:
        weights = src.get(f"/v1/zoo/models/{card['id']}/weights").content
        r = dst.post("/v1/zoo/models", data={"card": json.dumps(card)},
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


def test_a_replica_loads_a_base_registered_through_another(tmp_path: Path) -> None:
    """Two servers on one database and blob store, both started before the base existed: a path
    composed through one predicts through the other, which loads the base on first need."""
    from safetensors.torch import save

    from tests.conftest import tiny_card, tiny_weights

    a = start_app(make_settings(tmp_path))
    b = start_app(make_settings(tmp_path))
    try:
        card = tiny_card("late").model_dump(mode="json")
        weights = save(tiny_weights("resnet_s", 10))
        r = a.post("/v1/zoo/models", data={"card": json.dumps(card)}, files={"weights": ("w.safetensors", weights)})
        assert r.status_code == 201, r.text
        assert b.get("/readyz").json()["bases"] == 0
        pid = compose(a, reprogram_spec(base="late"))["path_id"]
        inputs = tensor_inputs(3, seed=1)
        here = a.post(f"/v1/paths/{pid}/predict", json={"inputs": inputs}).json()
        there = b.post(f"/v1/paths/{pid}/predict", json={"inputs": inputs})
        assert there.status_code == 200 and there.json() == here, there.text
        assert b.get("/readyz").json()["bases"] == 1
    finally:
        a.__exit__(None, None, None)
        b.__exit__(None, None, None)
