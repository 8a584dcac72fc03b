"""CLR continual learning: five tasks in sequence; the first path's predictions stay bit-identical."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from tests.conftest import in_process
from tests.helpers import bundle_roundtrip, compose, reprogram_spec, tensor_inputs
from zoo_store.core.bundle import PathArtifact, decode_bundle, encode_bundle, make_manifest

TASKS = [
    {"dataset": "digits", "samples_per_label": 6},
    {"dataset": "mnist-inverted", "samples_per_label": 6},
    {"dataset": "mnist-rotated", "samples_per_label": 6},
    {"dataset": "mnist-parity", "samples_per_label": 20},
    {"dataset": "mnist-0-4", "samples_per_label": 6},
]


def _probe(client: TestClient, pid: str) -> list[float]:
    svc = client.app.state.services
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    body = {"inputs": [{"tensor": t.tolist()} for t in x], "top_k": 10}
    preds = client.post(f"/v1/paths/{pid}/predict", json=body).json()["predictions"]
    svc.cache.evict(pid)  # the next probe materializes again from the stored path
    return [s["score"] for p in preds for s in p["top_k"]]


@in_process()
def test_five_tasks_in_sequence(app_client: TestClient) -> None:
    svc = app_client.app.state.services
    digests = svc.zoo.digests()
    first = compose(app_client, reprogram_spec(task=TASKS[0]))["path_id"]
    before = _probe(app_client, first)
    later = [compose(app_client, reprogram_spec(task=t))["path_id"] for t in TASKS[1:]]
    assert len({first, *later}) == 5
    for pid in later:
        assert (
            app_client.post(f"/v1/paths/{pid}/predict", json={"inputs": [{"tensor": [[[0.0] * 28] * 28]}]}).status_code
            == 200
        )
    assert _probe(app_client, first) == before  # bit-identical
    assert svc.zoo.digests() == digests


@in_process()
def test_batchnorm_paths_leave_earlier_paths_bit_identical(app_client: TestClient) -> None:
    """Paths with their own BatchNorm join the same base (and its mixed batches): the earlier paths,
    with and without their own BatchNorm, predict bit for bit as before, and the base is unchanged."""
    svc = app_client.app.state.services
    digests = svc.zoo.digests()
    plain = compose(app_client, reprogram_spec(task=TASKS[0]))
    own = compose(app_client, reprogram_spec(task=TASKS[1], options={"bn": True}))
    assert plain["state"] == own["state"] == "succeeded", (plain, own)
    before = {pid: _probe(app_client, pid) for pid in (plain["path_id"], own["path_id"])}
    later = [
        compose(app_client, reprogram_spec(task=t, options={"bn": i % 2 == 0}))["path_id"]
        for i, t in enumerate(TASKS[2:])
    ]
    assert len({*before, *later}) == 5
    for pid in later:
        assert app_client.post(
            f"/v1/paths/{pid}/predict", json={"inputs": [{"tensor": [[[0.5] * 28] * 28]}]}
        ).is_success
    assert {pid: _probe(app_client, pid) for pid in before} == before  # bit-identical
    assert svc.zoo.digests() == digests
    assert before[own["path_id"]] != before[plain["path_id"]]


@pytest.mark.parametrize(
    ("base", "options", "says"),
    [
        ("res", {"bn": "yes"}, "options.bn"),
        ("res", {"batchnorm": True}, "options.batchnorm"),
        ("res", ["bn"], "options"),
    ],
)
def test_bad_reprogram_options_are_422(app_client: TestClient, base: str, options: object, says: str) -> None:
    r = app_client.post("/v1/compositions", json=reprogram_spec(base=base, options=options))  # type: ignore[arg-type]
    assert r.status_code == 422, r.text
    assert says in r.text


def test_options_of_a_method_without_any_are_422(app_client: TestClient) -> None:
    spec = {"method": "resample", "base": "res", "budget": {"width": 0.5}, "options": {"bn": True}}
    r = app_client.post("/v1/compositions", json=spec)
    assert r.status_code == 422, r.text
    assert "takes no options" in r.text


def test_batchnorm_bundle_round_trip_and_a_bundle_without_its_batchnorm(app_client: TestClient) -> None:
    pid = compose(app_client, reprogram_spec(options={"bn": True}))["path_id"]
    bundle_roundtrip(app_client, pid, {"inputs": tensor_inputs(2)})
    b = decode_bundle(app_client.get(f"/v1/paths/{pid}/bundle").content)
    assert b.manifest.config["bn"] is True and any(k.startswith("bn.") for k in b.tensors)
    tensors = {k: v for k, v in b.tensors.items() if not k.startswith("bn.")}
    m = b.manifest
    art = PathArtifact(m.method, list(m.bases), list(m.labels), m.input, m.config, tensors)
    r = app_client.post("/v1/paths/import", content=encode_bundle(make_manifest(art), tensors, b.metrics))
    assert 400 <= r.status_code < 500, r.text
    assert "bn." in r.text
