"""Jobs in a child process (the embedded default), and recovery of jobs a dead server left."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import make_settings, start_app, tiny_card, tiny_weights
from tests.helpers import reprogram_spec, wait_job
from zoo_store.store.db import Database
from zoo_store.store.store import Store


def test_job_in_child_process_and_recovery(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, job_executor="process")
    client = start_app(settings)
    try:
        svc = client.app.state.services
        card, _ = svc.store.add_base(tiny_card("res"), tiny_weights("resnet_s", 10))
        svc.zoo.add(card)
        job = client.post("/v1/compositions", json=reprogram_spec()).json()
        done = wait_job(client, job["id"], timeout=180)
        assert done["state"] == "succeeded", done
        assert (
            client.post(
                f"/v1/paths/{done['path_id']}/predict", json={"inputs": [{"tensor": [[[0.5] * 28] * 28]}]}
            ).status_code
            == 200
        )
    finally:
        client.__exit__(None, None, None)

    # A server that died left one job running and one queued.
    store = Store(Database(settings.db_url), svc.store.blobs)
    stuck = store.create_job(reprogram_spec())
    store.update_job(stuck.id, state="running")
    queued = store.create_job(reprogram_spec(seed=1))
    client = start_app(settings)
    try:
        assert client.get(f"/v1/jobs/{stuck.id}").json()["state"] == "failed"
        assert "server stopped" in client.get(f"/v1/jobs/{stuck.id}").json()["error"]
        assert wait_job(client, queued.id, timeout=180)["state"] == "succeeded"
    finally:
        client.__exit__(None, None, None)


def test_a_job_running_when_the_server_stops_is_requeued_at_the_next_start(tmp_path: Path) -> None:
    """A clean stop (SIGTERM, Ctrl-C: the app's shutdown) hands the running job back: its process is
    killed, the job is marked queued, not failed, and the next start runs it to the end."""
    import time

    settings = make_settings(tmp_path, job_executor="process")
    client = start_app(settings)
    try:
        svc = client.app.state.services
        card, _ = svc.store.add_base(tiny_card("res"), tiny_weights("resnet_s", 10))
        svc.zoo.add(card)
        job = client.post("/v1/compositions", json=reprogram_spec(epochs=20)).json()
        end = time.monotonic() + 120
        while (seen := client.get(f"/v1/jobs/{job['id']}").json())["progress"].get("epoch", 0) < 1:
            assert seen["state"] in ("queued", "running") and time.monotonic() < end, seen
            time.sleep(0.05)
        proc = svc.runner.procs[job["id"]]
    finally:
        client.__exit__(None, None, None)
    assert not proc.is_alive()
    store = Store(Database(settings.db_url), svc.store.blobs)
    stopped = store.job(job["id"])
    assert (stopped.state, stopped.error, stopped.progress) == ("queued", None, {"fraction": 0.0})
    store.db.dispose()
    client = start_app(settings)
    try:
        done = wait_job(client, job["id"], timeout=180)
        assert done["state"] == "succeeded", done
    finally:
        client.__exit__(None, None, None)
