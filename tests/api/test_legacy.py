"""A database and a bundle made by main before the layout of issue 34 (tests/fixtures/legacy-4c3e041)
still load: the old SQLite file migrates and serves its paths with the same predictions, and the old
bundle imports under the same id, predicts the same and exports byte for byte."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import make_settings, start_app
from tests.helpers import tensor_inputs

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "legacy-4c3e041"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())


@pytest.fixture
def legacy(tmp_path: Path) -> TestClient:
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(FIXTURES / "zoo.db", data / "zoo.db")
    shutil.copy(FIXTURES / "admin.key", data / "admin.key")
    client = start_app(make_settings(data, blob_store="database"))
    yield client
    client.__exit__(None, None, None)


def _same(answer: dict, expected: dict) -> None:
    assert answer["path_id"] == expected["path_id"]
    for got, want in zip(answer["predictions"], expected["predictions"], strict=True):
        assert [t["label"] for t in got["top_k"]] == [t["label"] for t in want["top_k"]]
        assert got["score"] == pytest.approx(want["score"], abs=1e-5)


def _predict(client: TestClient, path_id: str) -> dict:
    r = client.post(f"/v1/paths/{path_id}/predict", json={"inputs": tensor_inputs(4, seed=3), "top_k": 3})
    assert r.status_code == 200, r.text
    return r.json()


def test_an_old_database_migrates_and_serves_its_paths(legacy: TestClient) -> None:
    assert legacy.get("/v1/zoo/models/res").json()["digest"] == EXPECTED["card"]["digest"]
    ids = {p["id"] for p in legacy.get("/v1/paths").json()["items"]}
    assert ids == {EXPECTED["reprogram"], EXPECTED["resample"]}
    for path_id in ids:
        _same(_predict(legacy, path_id), EXPECTED["predictions"][path_id])


def test_an_old_bundle_imports_under_its_id_and_exports_the_same_bytes(legacy: TestClient) -> None:
    path_id, bundle = EXPECTED["reprogram"], (FIXTURES / "reprogram.zoopath").read_bytes()
    assert legacy.delete(f"/v1/paths/{path_id}").status_code == 204
    r = legacy.post("/v1/paths/import", content=bundle)
    assert r.status_code == 201 and r.json()["id"] == path_id, r.text
    _same(_predict(legacy, path_id), EXPECTED["predictions"][path_id])
    assert legacy.get(f"/v1/paths/{path_id}/bundle").content == bundle
