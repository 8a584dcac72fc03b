"""One tenant's request cannot fail another's: predicts keep answering 200 while specs of every
method are posted alongside, refused and accepted (issue 33: a refused resample spec traced with
torch.fx on a request thread, and predicts running at that moment failed with 500)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from fastapi.testclient import TestClient

from tests.conftest import on_sqlite
from tests.helpers import SMALL_TASK, compose, reprogram_spec, tensor_inputs, wait_job

TINY = {"epochs": 1, "steps": 3, "batch_size": 8}
ACCEPTED = [
    reprogram_spec(),
    {"method": "resample", "base": "res", "budget": {"width": 0.5}},
    {
        "method": "clone",
        "base": "res",
        "sources": [{"model": "vgg", "labels": ["1", "2"]}],
        "task": SMALL_TASK,
        "train": TINY,
    },
    {"method": "reassemble", "models": ["res", "vgg"], "blocks": 2, "task": SMALL_TASK, "train": TINY},
]
REFUSED = [
    {"method": "resample", "base": "res", "budget": {"max_params": 10}},  # traced, then refused
    {"method": "resample", "base": "vgg", "budget": {"width": 0.0001, "max_params": 5}},
    reprogram_spec(base="nope"),
    {"method": "clone", "base": "res", "sources": [{"model": "nope", "labels": ["1"]}], "task": SMALL_TASK},
    {"method": "reassemble", "models": ["res"], "task": SMALL_TASK},
]


@on_sqlite()  # the storage legs run elsewhere
def test_predicts_alongside_refused_and_accepted_specs_of_every_method(app_client: TestClient) -> None:
    path_id = compose(app_client, reprogram_spec())["path_id"]
    body = {"inputs": tensor_inputs(2)}
    want = app_client.post(f"/v1/paths/{path_id}/predict", json=body).json()
    stop, answers = threading.Event(), []

    def predicts() -> None:
        while not stop.is_set():
            try:
                r = app_client.post(f"/v1/paths/{path_id}/predict", json=body)
            except Exception as e:  # noqa: BLE001 - in process, the app's own exception reaches the client
                answers.append(type(e).__name__)
                continue
            answers.append(r.status_code if r.status_code != 200 or r.json() == want else "changed")

    with ThreadPoolExecutor(3) as pool:
        for _ in range(3):
            pool.submit(predicts)
        try:
            statuses = [app_client.post("/v1/compositions", json=spec).status_code for spec in REFUSED * 4]
            jobs = [app_client.post("/v1/compositions", json=spec) for spec in ACCEPTED]
            ended = [wait_job(app_client, r.json()["id"], timeout=300)["state"] for r in jobs]
        finally:
            stop.set()
    assert set(statuses) == {422}, statuses
    assert [r.status_code for r in jobs] == [202] * len(ACCEPTED) and ended == ["succeeded"] * len(ACCEPTED), ended
    assert answers and set(answers) == {200}, {a: answers.count(a) for a in set(answers)}
