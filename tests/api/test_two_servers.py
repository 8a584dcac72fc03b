"""A bundle exported from one server and imported into a second one predicts identically."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import make_settings, start_app
from tests.helpers import compose, png_b64, reprogram_spec, tensor_inputs


def _pull_bases(src: TestClient, dst: TestClient) -> None:
    """What `zoo models pull` does: each card as the first server returns it, and its weights."""
    for card in src.get("/v1/zoo/models").json()["items"]:
        weights = src.get(f"/v1/zoo/models/{card['id']}/weights").content
        r = dst.post("/v1/zoo/models", data={"card": json.dumps(card)}, files={"weights": ("w.safetensors", weights)})
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


def _register_late_base(client: TestClient) -> None:
    from safetensors.torch import save

    from tests.conftest import tiny_card, tiny_weights

    card = tiny_card("late").model_dump(mode="json")
    weights = save(tiny_weights("resnet_s", 10))
    r = client.post("/v1/zoo/models", data={"card": json.dumps(card)}, files={"weights": ("w.safetensors", weights)})
    assert r.status_code == 201, r.text


def test_a_replica_loads_a_base_registered_through_another(tmp_path: Path) -> None:
    """Two servers on one database and blob store, both started before the base existed (and not
    looking for new bases within the test): a path composed through one predicts through the
    other, which loads the base on first need."""
    a = start_app(make_settings(tmp_path, zoo_poll_s=3600))
    b = start_app(make_settings(tmp_path, zoo_poll_s=3600))
    try:
        _register_late_base(a)
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


@pytest.mark.parametrize("blob_store", ["dir", "database"])
def test_replicas_follow_the_zoo_version(tmp_path: Path, blob_store: str) -> None:
    """A base registered through one replica is loaded by the other without any request for it,
    within a few polls, and /readyz says which zoo version each has; with blobs in the database
    the two share nothing but the database (each its own data dir)."""
    a = start_app(
        make_settings(
            tmp_path / "a", database_url=f"sqlite:///{tmp_path / 'zoo.db'}", blob_store=blob_store, zoo_poll_s=0.05
        )
    )
    b_dir = tmp_path / ("b" if blob_store == "database" else "a")
    b = start_app(
        make_settings(b_dir, database_url=f"sqlite:///{tmp_path / 'zoo.db'}", blob_store=blob_store, zoo_poll_s=0.05)
    )
    b.headers["Authorization"] = a.headers["Authorization"]  # the first start (a's) wrote the admin key
    try:
        assert a.get("/readyz").json()["zoo_version"] == b.get("/readyz").json()["zoo_version"] == 0
        _register_late_base(a)
        assert a.get("/readyz").json()["zoo_version"] == 1
        end = time.monotonic() + 30
        while b.get("/readyz").json()["zoo_version"] != 1:
            assert time.monotonic() < end, "replica b never loaded the base registered through a"
            time.sleep(0.05)
        assert b.get("/readyz").json()["bases"] == 1
        if blob_store == "database":  # the weights went nowhere on disk
            assert not (tmp_path / "a" / "blobs").exists() and not (tmp_path / "b" / "blobs").exists()
        assert b.get("/v1/zoo/models/late/weights").content == a.get("/v1/zoo/models/late/weights").content

        # a path deleted through a is dropped from b's cache too (b served it a moment ago)
        pid = compose(a, reprogram_spec(base="late"))["path_id"]
        inputs = tensor_inputs(2, seed=3)
        assert b.post(f"/v1/paths/{pid}/predict", json={"inputs": inputs}).status_code == 200
        assert a.delete(f"/v1/paths/{pid}").status_code == 204
        while (r := b.post(f"/v1/paths/{pid}/predict", json={"inputs": inputs})).status_code == 200:
            assert time.monotonic() < end, "replica b still serves a path deleted through a"
            time.sleep(0.05)
        assert r.status_code == 404, r.text
    finally:
        a.__exit__(None, None, None)
        b.__exit__(None, None, None)
