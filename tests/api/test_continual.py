"""CLR continual learning: five tasks in sequence; the first path's predictions stay bit-identical."""

from __future__ import annotations

import torch
from fastapi.testclient import TestClient

from tests.helpers import compose, reprogram_spec

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
