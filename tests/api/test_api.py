"""End to end through HTTP on SQLite and PostgreSQL: compose, predict, bundles, jobs."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from fastapi.testclient import TestClient

from tests.conftest import on_sqlite
from tests.helpers import compose, png_b64, reprogram_spec, tensor_inputs


def test_health_ready_metrics(app_client: TestClient) -> None:
    assert app_client.get("/healthz").json() == {"status": "ok"}
    ready = app_client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["bases"] == 2
    assert "zoo_http_requests" in app_client.get("/metrics").text


def test_zoo_cards_and_weights(app_client: TestClient) -> None:
    items = app_client.get("/v1/zoo/models").json()["items"]
    assert [m["id"] for m in items] == ["res", "vgg"]
    card = app_client.get("/v1/zoo/models/res").json()
    assert card["taps"][-1]["name"] == "pool" and card["num_params"] > 0
    weights = app_client.get("/v1/zoo/models/res/weights")
    assert weights.headers["x-zoo-digest"] == card["digest"]
    assert app_client.get("/v1/zoo/models/nope").status_code == 404


def test_paging(app_client: TestClient) -> None:
    first = app_client.get("/v1/datasets", params={"limit": 2}).json()
    assert len(first["items"]) == 2 and first["next_cursor"]
    second = app_client.get("/v1/datasets", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert {d["id"] for d in first["items"]}.isdisjoint({d["id"] for d in second["items"]})


def test_reprogram_compose_predict_bundle_roundtrip(app_client: TestClient) -> None:
    job = compose(app_client, reprogram_spec())
    assert job["state"] == "succeeded", job
    pid = job["path_id"]
    path = app_client.get(f"/v1/paths/{pid}").json()
    assert path["method"] == "reprogram" and path["labels"] == ["0", "1", "2"]
    assert path["bases"][0]["id"] == "res" and 0 < path["bytes"] < path["dense_bytes"]
    assert 0.0 <= job["metrics"]["accuracy"] <= 1.0

    inputs = tensor_inputs(3) + [{"image": png_b64()}]
    before = app_client.post(f"/v1/paths/{pid}/predict", json={"inputs": inputs, "top_k": 2}).json()
    assert before["path_id"] == pid and len(before["predictions"]) == 4
    assert all(len(p["top_k"]) == 2 and p["label"] in ("0", "1", "2") for p in before["predictions"])

    bundle = app_client.get(f"/v1/paths/{pid}/bundle").content
    assert app_client.post("/v1/paths/import", content=bundle).status_code == 200  # exists already
    assert app_client.delete(f"/v1/paths/{pid}").status_code == 204
    assert app_client.get(f"/v1/paths/{pid}").status_code == 404
    assert app_client.post(f"/v1/paths/{pid}/predict", json={"inputs": inputs}).status_code == 404
    imported = app_client.post("/v1/paths/import", content=bundle)
    assert imported.status_code == 201 and imported.json()["id"] == pid
    after = app_client.post(f"/v1/paths/{pid}/predict", json={"inputs": inputs, "top_k": 2}).json()
    assert after == before


def test_composition_is_repeatable(app_client: TestClient) -> None:
    a = compose(app_client, reprogram_spec(seed=3))
    b = compose(app_client, reprogram_spec(seed=3))
    assert a["path_id"] == b["path_id"]
    c = compose(app_client, reprogram_spec(seed=4))
    assert c["path_id"] != a["path_id"]


def test_multipart_predict(app_client: TestClient) -> None:
    import base64

    pid = compose(app_client, reprogram_spec())["path_id"]
    png = base64.b64decode(png_b64())
    r = app_client.post(
        f"/v1/paths/{pid}/predict", files=[("files", ("a.png", png, "image/png"))] * 2, data={"top_k": "3"}
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 2 and len(r.json()["predictions"][0]["top_k"]) == 3


def test_non_square_image_predicts_as_its_centre_crop(app_client: TestClient) -> None:
    """28x56 and 56x28 images with noise on the sides score as the tensor of their centre 28x28
    (the base's card has no resize: the shorter side is kept, the longer one cropped, not squashed)."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    pid = compose(app_client, reprogram_spec())["path_id"]
    rng = np.random.default_rng(5)
    inputs, crops = [], []
    for h, w in [(28, 56), (56, 28)]:
        pixels = rng.integers(0, 256, (h, w), dtype=np.uint8)
        top, left = (h - 28) // 2, (w - 28) // 2
        crops.append({"tensor": (pixels[None, top : top + 28, left : left + 28] / 255.0).tolist()})
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        inputs.append({"image": base64.b64encode(buf.getvalue()).decode()})
    got, want = (
        app_client.post(f"/v1/paths/{pid}/predict", json={"inputs": body, "top_k": 3}).json()["predictions"]
        for body in (inputs, crops)
    )
    for g, w in zip(got, want, strict=True):
        assert [t["label"] for t in g["top_k"]] == [t["label"] for t in w["top_k"]]
        assert [t["score"] for t in g["top_k"]] == pytest.approx([t["score"] for t in w["top_k"]], abs=1e-5)


def test_npy_predict_matches_json(app_client: TestClient) -> None:
    """A .npy body (float32 or uint8) scores exactly as the same values sent as JSON tensors."""
    import io

    import numpy as np

    pid = compose(app_client, reprogram_spec())["path_id"]
    pixels = np.random.default_rng(0).integers(0, 256, (3, 1, 28, 28), dtype=np.uint8)
    as_json = {"inputs": [{"tensor": (p / 255.0).tolist()} for p in pixels.astype(np.float32)], "top_k": 3}
    want = app_client.post(f"/v1/paths/{pid}/predict", json=as_json).json()
    for arr in (pixels, pixels.astype(np.float32) / np.float32(255)):
        buf = io.BytesIO()
        np.save(buf, arr)
        r = app_client.post(
            f"/v1/paths/{pid}/predict?top_k=3",
            content=buf.getvalue(),
            headers={"content-type": "application/octet-stream"},
        )
        assert r.status_code == 200, r.text
        got = r.json()
        assert [p["label"] for p in got["predictions"]] == [p["label"] for p in want["predictions"]]
        for a, b in zip(got["predictions"], want["predictions"], strict=True):
            assert len(a["top_k"]) == 3
            assert abs(a["score"] - b["score"]) < 1e-6


def test_a_first_npy_predict_needs_no_describe(app_client: TestClient, monkeypatch) -> None:
    """Behind HTTP workers, a worker's first .npy predict of a path learns the path's input and
    labels from the predict's own answer (one round trip to the inference process); a JSON body
    asks for them first. Either way the scores are the same."""
    import io

    import numpy as np

    svc = app_client.app.state.services
    asked: list[str] = []
    describe = svc.describe
    monkeypatch.setattr(svc, "describe", lambda key, path_id: asked.append(path_id) or describe(key, path_id))
    p1, p2 = (compose(app_client, reprogram_spec(seed=s))["path_id"] for s in (0, 1))
    pixels = np.random.default_rng(0).integers(0, 256, (2, 1, 28, 28), dtype=np.uint8)
    buf = io.BytesIO()
    np.save(buf, pixels)
    npy = {}
    for pid in (p1, p2, p1, p2):  # whichever worker answers, cold or not
        r = app_client.post(
            f"/v1/paths/{pid}/predict?top_k=2",
            content=buf.getvalue(),
            headers={"content-type": "application/octet-stream"},
        )
        assert r.status_code == 200, r.text
        npy[pid] = r.json()["predictions"]
    assert asked == []  # every worker's first predict of a path carried its describe
    as_json = {"inputs": [{"tensor": (p / 255.0).tolist()} for p in pixels.astype(np.float32)], "top_k": 2}
    for pid in (p1, p2):
        r = app_client.post(f"/v1/paths/{pid}/predict", json=as_json)
        assert r.status_code == 200, r.text
        for a, b in zip(npy[pid], r.json()["predictions"], strict=True):
            assert a["label"] == b["label"] and abs(a["score"] - b["score"]) < 1e-6
    p3 = compose(app_client, reprogram_spec(seed=2))["path_id"]
    assert app_client.post(f"/v1/paths/{p3}/predict", json=as_json).status_code == 200
    assert asked.count(p3) == (1 if svc.settings.ipc_dir else 0)  # JSON: described first (in process: not asked)


def test_job_events_stream(app_client: TestClient) -> None:
    job_id = app_client.post("/v1/compositions", json=reprogram_spec()).json()["id"]
    events = []
    with app_client.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert events[-1] == {"state": "succeeded"}
    assert events[-2]["state"] == "succeeded" and events[-2]["path_id"]


def test_job_events_check_the_key_off_the_event_loop(app_client: TestClient, monkeypatch) -> None:
    """The stream's key checks (they may read the database) run on worker threads, not the event loop."""
    svc = app_client.app.state.services
    on_loop, check = [], svc.auth.caller

    def caller(key):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return check(key)

    monkeypatch.setattr(svc.auth, "caller", caller)
    job_id = compose(app_client, reprogram_spec())["id"]
    on_loop.clear()
    with app_client.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        assert r.status_code == 200 and "event: end" in r.read().decode()
    assert len(on_loop) >= 2 and not any(on_loop)  # the route's own, then the stream's


LONG = reprogram_spec(task={"dataset": "mnist", "samples_per_label": 500}, epochs=50)


def test_cancel_job(app_client: TestClient) -> None:
    job_id = app_client.post("/v1/compositions", json=LONG).json()["id"]
    r = app_client.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    from tests.helpers import wait_job

    job = wait_job(app_client, job_id)
    assert job["state"] == "cancelled" and job["path_id"] is None
    assert app_client.get("/v1/paths").json()["items"] == []


def test_delete_job(app_client: TestClient) -> None:
    """A deleted job is gone (its GET, events and cancel are 404) and the path it made stays; a
    running one is cancelled first (its event stream ends, it makes no path, it no longer counts
    against its tenant), and the runner goes on to the next job."""
    import threading
    import time

    done = compose(app_client, reprogram_spec())
    assert app_client.delete(f"/v1/jobs/{done['id']}").status_code == 204
    for r in (
        app_client.get(f"/v1/jobs/{done['id']}"),
        app_client.get(f"/v1/jobs/{done['id']}/events"),
        app_client.post(f"/v1/jobs/{done['id']}/cancel"),
        app_client.delete(f"/v1/jobs/{done['id']}"),
    ):
        assert r.status_code == 404, r.text
    assert app_client.get(f"/v1/paths/{done['path_id']}").status_code == 200

    store = app_client.app.state.services.store
    running = app_client.post("/v1/compositions", json=LONG).json()
    end = time.monotonic() + 60
    while app_client.get(f"/v1/jobs/{running['id']}").json()["state"] != "running" and time.monotonic() < end:
        time.sleep(0.05)
    assert store.usage(running["tenant"])["jobs"] == 1
    events: list[str] = []

    def follow() -> None:
        with app_client.stream("GET", f"/v1/jobs/{running['id']}/events") as r:
            events.extend(r.iter_lines())

    reader = threading.Thread(target=follow)
    reader.start()
    while not events and time.monotonic() < end:
        time.sleep(0.05)
    assert app_client.delete(f"/v1/jobs/{running['id']}").status_code == 204
    reader.join(30)
    assert not reader.is_alive() and "event: end" in events and "no job" in events[-2]
    assert app_client.get(f"/v1/jobs/{running['id']}").status_code == 404
    assert store.usage(running["tenant"])["jobs"] == 0
    after = compose(app_client, reprogram_spec(seed=5))  # the runner survived the job deleted under it
    assert after["state"] == "succeeded"
    paths = {p["id"] for p in app_client.get("/v1/paths").json()["items"]}
    assert paths == {done["path_id"], after["path_id"]}


def test_resident_digests_unchanged(app_client: TestClient) -> None:
    svc = app_client.app.state.services
    before = svc.zoo.digests()
    assert before == {k: c.digest for k, (c, _) in svc.zoo.bases.items()}
    pid = compose(app_client, reprogram_spec(epochs=2))["path_id"]
    app_client.post(f"/v1/paths/{pid}/predict", json={"inputs": tensor_inputs(2)})
    assert svc.zoo.digests() == before


def test_upload_dataset_and_compose_on_it(app_client: TestClient) -> None:
    import io
    import zipfile

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for label, level in (("dark", 40), ("light", 215)):
            for i in range(10):
                img = np.clip(rng.normal(level, 20, (16, 16)), 0, 255).astype(np.uint8)
                png = io.BytesIO()
                Image.fromarray(img).save(png, format="PNG")
                z.writestr(f"shades/{label}/{i}.png", png.getvalue())
    r = app_client.post("/v1/datasets", files={"file": ("shades.zip", buf.getvalue(), "application/zip")})
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["labels"] == ["dark", "light"] and ds["num_samples"] == 20 and ds["shape"] == [1, 16, 16]
    assert app_client.get(f"/v1/datasets/{ds['id']}").json() == ds
    job = compose(app_client, reprogram_spec(task={"dataset": ds["id"]}, epochs=3))
    assert job["state"] == "succeeded", job
    assert ds["splits"] == {"train": 14, "val": 2, "test": 4}
    assert job["metrics"]["train_samples"] == 14 and job["metrics"]["test_samples"] == 4
    assert app_client.get(f"/v1/paths/{job['path_id']}").json()["labels"] == ["dark", "light"]


def test_not_ready_while_the_demo_zoo_builds(tmp_path, monkeypatch) -> None:
    """Until the zoo is resident, /readyz is 503 naming the build step, and routes that need it are 503."""
    import threading

    import service.api.state
    from tests.conftest import make_settings

    release = threading.Event()

    def slow_build(store, samples, say) -> None:
        say("demo zoo: training resnet-mnist (resnet_s on mnist, 12000 samples) [1/5]")
        release.wait(30)

    monkeypatch.setattr(service.api.state, "ensure_demo_zoo", slow_build)
    from service.api.app import create_app

    with TestClient(create_app(make_settings(tmp_path, demo_zoo=True))) as client:
        r = client.get("/readyz")
        assert r.status_code == 503 and "training resnet-mnist" in r.json()["detail"]
        r = client.post("/v1/paths/p_" + "0" * 32 + "/predict", json={"inputs": []})
        assert r.status_code == 503 and "still loading" in r.json()["detail"]
        assert client.get("/healthz").status_code == 200
        release.set()
        assert client.app.state.services.ready.wait(10)
        assert client.get("/readyz").json()["status"] == "ready"


def test_docs_and_redoc_need_no_cdn(app_client: TestClient) -> None:
    """Swagger UI and ReDoc load their scripts from files installed with the package."""
    for page in ("/docs", "/redoc"):
        html = app_client.get(page).text
        scripts = re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', html)
        assert scripts and all(s.startswith("/") for s in scripts), scripts  # this server, not a CDN
        for s in scripts:
            r = app_client.get(s)
            assert r.status_code == 200 and len(r.content) > 10_000, s


def test_405_names_every_method_of_the_path(app_client: TestClient) -> None:
    r = app_client.request("OPTIONS", "/v1/jobs/job_1")
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET"  # Starlette's own names the first route's only
    assert app_client.request("PUT", "/v1/paths/import").headers["allow"] == "POST"  # not /v1/paths/{path_id}'s


def test_the_openapi_document_declares_each_operations_errors(app_client: TestClient) -> None:
    doc = app_client.get("/openapi.json").json()
    predict = doc["paths"]["/v1/paths/{path_id}/predict"]["post"]["responses"]
    assert {"400", "404", "413", "422", "503"} <= set(predict)
    assert set(predict["422"]["content"]) == {"application/problem+json"}
    assert "507" not in predict and "507" in doc["paths"]["/v1/paths/import"]["post"]["responses"]  # it stores
    assert "503" in doc["paths"]["/v1/paths"]["get"]["responses"]  # the database may be away
    infer = doc["paths"]["/v2/models/{model_id}/infer"]["post"]["responses"]
    assert infer["404"]["content"]["application/json"]["schema"]["required"] == ["error"]
    assert "409" in doc["paths"]["/v1/paths/{path_id}/network"]["get"]["responses"]
    assert set(doc["paths"]["/healthz"]["get"]["responses"]) == {"200"}  # nothing to refuse
    assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "HTTPValidationError" not in doc.get("components", {}).get("schemas", {})
    events = doc["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]
    assert set(events["content"]) == {"text/event-stream"}  # what it answers: no JSON
    assert doc["paths"]["/v1/jobs/{job_id}"]["delete"]["responses"]["204"]


def test_an_id_with_any_bytes_is_a_404_not_a_500(app_client: TestClient) -> None:
    """Through an HTTP worker too: the pass-through keeps the path as sent (percent-encoded)."""
    for url in ("/v1/jobs/V%F3%AF%83%B5%7F", "/v1/datasets/%1B%5B0m", "/v1/paths/a%20b?x=%00"):
        r = app_client.get(url)
        assert r.status_code == 404, (url, r.text)


def test_a_card_as_get_returns_it_registers_elsewhere(app_client: TestClient) -> None:
    """Server-computed fields are checked against the weights, not refused as extra fields."""
    card = app_client.get("/v1/zoo/models/res").json()
    weights = app_client.get("/v1/zoo/models/res/weights").content
    files = {"weights": ("w.safetensors", weights, "application/octet-stream")}
    copy = {**card, "id": "res-copy"}
    r = app_client.post("/v1/zoo/models", data={"card": json.dumps(copy)}, files=files)
    assert r.status_code == 201 and r.json()["digest"] == card["digest"], r.text
    forged = {**card, "id": "res-forged", "digest": "0" * 64}
    r = app_client.post("/v1/zoo/models", data={"card": json.dumps(forged)}, files=files)
    assert r.status_code == 409 and "0" * 64 in r.json()["detail"] and card["digest"] in r.json()["detail"]
    assert app_client.get("/v1/zoo/models/res-forged").status_code == 404  # nothing written


def test_dataset_samples_and_their_bad_input(app_client: TestClient) -> None:
    r = app_client.get("/v1/datasets/digits/samples.png?n=3")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content.startswith(b"\x89PNG")
    assert app_client.get("/v1/datasets/digits/samples.png?n=0").status_code == 422
    assert app_client.get("/v1/datasets/digits/samples.png?n=33").status_code == 422
    assert app_client.get("/v1/datasets/nope/samples.png").status_code == 404


@on_sqlite()
def test_a_paths_evaluation_is_its_predicts_on_the_held_out_images(app_client: TestClient) -> None:
    """The path page's confusion matrix: the predicts of the dataset's first held-out images of the
    path's labels, counted; and each sample strip's labels are its images'."""
    import io

    import numpy as np

    pid = compose(app_client, reprogram_spec())["path_id"]  # digits 0, 1, 2
    r = app_client.get(f"/v1/paths/{pid}/evaluation", params={"dataset": "digits", "n": 40})
    assert r.status_code == 200, r.text
    got = r.json()
    arrays = app_client.app.state.services.store.arrays("digits")
    keep = np.flatnonzero(np.isin(arrays.test_y, [arrays.labels.index(k) for k in ("0", "1", "2")]))[:40]
    buf = io.BytesIO()
    np.save(buf, arrays.test_x[keep])
    predicted = app_client.post(
        f"/v1/paths/{pid}/predict", content=buf.getvalue(), headers={"content-type": "application/octet-stream"}
    ).json()["predictions"]
    want = np.zeros((3, 3), dtype=int)
    for true, p in zip(arrays.test_y[keep], predicted, strict=True):
        want[["0", "1", "2"].index(arrays.labels[true]), ["0", "1", "2"].index(p["label"])] += 1
    assert got["labels"] == ["0", "1", "2"] and got["samples"] == 40 and got["matrix"] == want.tolist()
    assert got["accuracy"] == np.trace(want) / 40
    r = app_client.get(f"/v1/paths/{pid}/evaluation", params={"dataset": "letters"})
    assert r.status_code == 422 and "no held-out images of the path's labels" in r.json()["detail"]
    assert app_client.get(f"/v1/paths/{pid}/evaluation", params={"dataset": "nope"}).status_code == 404

    strip = app_client.get("/v1/datasets/digits/samples", params={"n": 5}).json()
    assert strip["labels"] == [arrays.labels[v] for v in arrays.test_y[:5]]
    png = app_client.get(strip["png"])
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")


@on_sqlite()
def test_a_job_keeps_its_curve(app_client: TestClient) -> None:
    """Every loss a build reports is kept in the job's progress (the dashboard draws it for a job that
    ended before anyone watched); lists leave it out."""
    job = compose(app_client, reprogram_spec(epochs=3))
    curve = app_client.get(f"/v1/jobs/{job['id']}").json()["progress"]["curve"]
    assert [p["epoch"] for p in curve] == [1, 2, 3] and all(p["loss"] > 0 for p in curve), curve
    listed = next(j for j in app_client.get("/v1/jobs").json()["items"] if j["id"] == job["id"])
    assert "curve" not in listed["progress"] and listed["spec"]["train"]["epochs"] == 3
