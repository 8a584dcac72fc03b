"""The authorization matrix: every route of the OpenAPI document x {no key, a revoked key, tenant A,
tenant B, an admin}, each cell's status asserted. Tenant A owns a dataset, a job and a path; B owns
nothing, so A's things are 404 to it; an admin sees everything. The test fails when a route is added
without its row. Run in process and through the HTTP workers (they check keys on predicts too)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.torch import save

from bench.scale import make_paths
from tests.conftest import HTTP_WORKERS, make_settings, serving_client, start_app, tiny_card, tiny_weights
from tests.helpers import SMALL_TASK, tensor_inputs, wait_job

WHO = ("none", "revoked", "a", "b", "admin")
OPEN = dict.fromkeys(WHO, 200)


def keyed(a: int | set[int], b: int | set[int] | None = None, admin: int | set[int] | None = None) -> dict:
    """A route that needs a key: 401 without a live one; A's, B's and an admin's status."""
    return {"none": 401, "revoked": 401, "a": a, "b": a if b is None else b, "admin": a if admin is None else admin}


def admin_only(status: int) -> dict:
    return keyed(403, 403, status)


@dataclass
class World:
    client: Any  # TestClient or FrontClient: an httpx.Client with the admin key
    keys: dict[str, str | None]
    dataset: str
    job: str
    path: str
    bundle: bytes  # A's path's
    other: bytes  # another path's bundle, for the import cells (so they change nobody's access to A's)
    card: dict
    weights: bytes

    def throwaway_key(self) -> str:
        return self.client.post("/v1/keys", json={"tenant": "throwaway"}).json()["id"]

    def sign_in_token(self) -> str:
        return self.client.post("/v1/keys/sign-in").json()["token"]

    def throwaway_job(self) -> str:
        """A job of A's that no runner takes (it is not queued)."""
        spec = {"method": "reprogram", "base": "res", "task": SMALL_TASK}
        return self.client.app.state.services.store.create_job(spec, "a").id


def _npz() -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    np.savez(buf, x=rng.integers(0, 256, (12, 28, 28), dtype=np.uint8), y=np.arange(12) % 2)
    return buf.getvalue()


PREDICT = {"inputs": tensor_inputs(1)}
INFER = {"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.5] * 784}]}
Req = Callable[[World], tuple[str, dict]]

# (method, route) -> (the request: url and httpx keyword arguments, the status of each caller)
MATRIX: dict[tuple[str, str], tuple[Req, dict]] = {
    ("GET", "/healthz"): (lambda w: ("/healthz", {}), OPEN),
    ("GET", "/readyz"): (lambda w: ("/readyz", {}), OPEN),
    ("GET", "/metrics"): (lambda w: ("/metrics", {}), OPEN),
    ("GET", "/v1/zoo/models"): (lambda w: ("/v1/zoo/models", {}), keyed(200)),
    ("POST", "/v1/zoo/models"): (
        lambda w: (
            "/v1/zoo/models",
            {"data": {"card": json.dumps(w.card)}, "files": {"weights": ("w.safetensors", w.weights)}},
        ),
        admin_only(200),
    ),
    ("GET", "/v1/zoo/models/{model_id}"): (lambda w: ("/v1/zoo/models/res", {}), keyed(200)),
    ("GET", "/v1/zoo/models/{model_id}/weights"): (lambda w: ("/v1/zoo/models/res/weights", {}), keyed(200)),
    # every tenant reads the zoo, and may predict with a base by itself
    ("POST", "/v1/zoo/models/{model_id}/predict"): (
        lambda w: ("/v1/zoo/models/res/predict", {"json": PREDICT}),
        keyed(200),
    ),
    # admins only; an admin's 422: a name that is no packaged network (checked after the key)
    ("POST", "/v1/zoo/models/pretrained"): (
        lambda w: ("/v1/zoo/models/pretrained", {"json": {"name": "no-such-network"}}),
        admin_only(422),
    ),
    ("GET", "/v1/datasets"): (lambda w: ("/v1/datasets", {}), keyed(200)),
    ("POST", "/v1/datasets"): (lambda w: ("/v1/datasets", {"files": {"file": ("d.npz", _npz())}}), keyed(201)),
    ("GET", "/v1/datasets/{dataset_id}"): (lambda w: (f"/v1/datasets/{w.dataset}", {}), keyed(200, 404)),
    ("GET", "/v1/datasets/{dataset_id}/samples"): (
        lambda w: (f"/v1/datasets/{w.dataset}/samples", {}),
        keyed(200, 404),
    ),
    ("GET", "/v1/datasets/{dataset_id}/samples.png"): (
        lambda w: (f"/v1/datasets/{w.dataset}/samples.png", {}),
        keyed(200, 404),
    ),
    ("POST", "/v1/compositions"): (
        lambda w: (
            "/v1/compositions",
            {"json": {"method": "reprogram", "base": "res", "task": SMALL_TASK, "train": {"epochs": 1, "seed": 7}}},
        ),
        keyed(202),
    ),  # seed 7: not A's path (the same spec makes the same path, owned by each composer)
    ("GET", "/v1/jobs"): (lambda w: ("/v1/jobs", {}), keyed(200)),
    ("GET", "/v1/jobs/{job_id}"): (lambda w: (f"/v1/jobs/{w.job}", {}), keyed(200, 404)),
    # A's job ended: answered as it is
    ("POST", "/v1/jobs/{job_id}/cancel"): (lambda w: (f"/v1/jobs/{w.job}/cancel", {}), keyed(200, 404)),
    ("DELETE", "/v1/jobs/{job_id}"): (lambda w: (f"/v1/jobs/{w.throwaway_job()}", {}), keyed(204, 404)),
    ("GET", "/v1/jobs/{job_id}/events"): (lambda w: (f"/v1/jobs/{w.job}/events", {}), keyed(200, 404)),
    ("GET", "/v1/paths"): (lambda w: ("/v1/paths", {}), keyed(200)),
    ("GET", "/v1/paths/{path_id}"): (lambda w: (f"/v1/paths/{w.path}", {}), keyed(200, 404)),
    ("DELETE", "/v1/paths/{path_id}"): (lambda w: (f"/v1/paths/{w.path}", {}), keyed(204, 404)),
    ("GET", "/v1/paths/{path_id}/evaluation"): (  # A's dataset is A's: B is refused the path first
        lambda w: (f"/v1/paths/{w.path}/evaluation", {"params": {"dataset": "digits", "n": 30}}),
        keyed(200, 404),
    ),
    ("GET", "/v1/paths/{path_id}/sharing"): (lambda w: (f"/v1/paths/{w.path}/sharing", {}), keyed(200, 404)),
    ("PUT", "/v1/paths/{path_id}/sharing"): (
        lambda w: (f"/v1/paths/{w.path}/sharing", {"json": {"tenants": ["c"]}}),
        keyed(200, 404),
    ),
    ("GET", "/v1/paths/{path_id}/bundle"): (lambda w: (f"/v1/paths/{w.path}/bundle", {}), keyed(200, 404)),
    ("GET", "/v1/paths/{path_id}/network"): (lambda w: (f"/v1/paths/{w.path}/network", {}), keyed(409, 404)),
    ("GET", "/v1/paths/{path_id}/export"): (
        lambda w: (f"/v1/paths/{w.path}/export", {"params": {"format": "pt2"}}),
        keyed(200, 404),
    ),
    ("POST", "/v1/paths/import"): (lambda w: ("/v1/paths/import", {"content": w.other}), keyed({200, 201})),
    ("POST", "/v1/paths/{path_id}/predict"): (
        lambda w: (f"/v1/paths/{w.path}/predict", {"json": PREDICT}),
        keyed(200, 404),
    ),
    ("POST", "/v1/keys"): (lambda w: ("/v1/keys", {"json": {"tenant": "c"}}), admin_only(201)),
    ("GET", "/v1/keys"): (lambda w: ("/v1/keys", {}), admin_only(200)),
    ("POST", "/v1/keys/sign-in"): (lambda w: ("/v1/keys/sign-in", {}), admin_only(201)),
    ("POST", "/v1/keys/exchange"): (  # the token is the credential: any key beside it, or none
        lambda w: ("/v1/keys/exchange", {"json": {"token": w.sign_in_token()}}),
        dict.fromkeys(WHO, 201),
    ),
    ("DELETE", "/v1/keys/{key_id}"): (lambda w: (f"/v1/keys/{w.throwaway_key()}", {}), admin_only(200)),
    ("GET", "/v1/tenants/{tenant}"): (lambda w: ("/v1/tenants/a", {}), admin_only(200)),
    ("PUT", "/v1/tenants/{tenant}/limits"): (
        lambda w: ("/v1/tenants/c/limits", {"json": {"max_jobs": 3}}),
        admin_only(200),
    ),
    ("GET", "/v1/audit"): (lambda w: ("/v1/audit", {}), admin_only(200)),
    ("GET", "/v2"): (lambda w: ("/v2", {}), keyed(200)),
    ("GET", "/v2/health/live"): (lambda w: ("/v2/health/live", {}), keyed(200)),
    ("GET", "/v2/health/ready"): (lambda w: ("/v2/health/ready", {}), keyed(200)),
    ("GET", "/v2/models/{model_id}"): (lambda w: (f"/v2/models/{w.path}", {}), keyed(200, 404)),
    ("GET", "/v2/models/{model_id}/ready"): (lambda w: (f"/v2/models/{w.path}/ready", {}), keyed(200, 404)),
    ("POST", "/v2/models/{model_id}/infer"): (
        lambda w: (f"/v2/models/{w.path}/infer", {"json": INFER}),
        keyed(200, 404),
    ),
}


@pytest.fixture(scope="module", params=HTTP_WORKERS, ids=[f"workers{n}" for n in HTTP_WORKERS])
def world(request, tmp_path_factory) -> Iterator[World]:
    client = serving_client(request, request.param, tmp_path_factory.mktemp("authz"))
    svc = client.app.state.services
    card, _ = svc.store.add_base(tiny_card("res"), tiny_weights("resnet_s", 10))
    svc.zoo.add(card)
    admin = client.headers["authorization"].removeprefix("Bearer ")
    keys: dict[str, str | None] = {"none": None, "admin": admin}
    for who in ("a", "b", "revoked"):
        made = client.post("/v1/keys", json={"tenant": who}).json()
        keys[who] = made["key"]
    revoked_id = next(k["id"] for k in client.get("/v1/keys").json()["items"] if k["tenant"] == "revoked")
    assert client.delete(f"/v1/keys/{revoked_id}").status_code == 200

    as_a = {"Authorization": f"Bearer {keys['a']}"}
    dataset = client.post("/v1/datasets", files={"file": ("d.npz", _npz())}, headers=as_a).json()["id"]
    job = client.post(
        "/v1/compositions",
        json={"method": "reprogram", "base": "res", "task": SMALL_TASK, "train": {"epochs": 1}},
        headers=as_a,
    ).json()["id"]
    path = wait_job(client, job)["path_id"]
    bundle = client.get(f"/v1/paths/{path}/bundle").content
    other = make_paths(svc.store, "res", 1)[0]
    weights = save(tiny_weights("resnet_s", 10))
    yield World(client, keys, dataset, job, path, bundle, other, tiny_card("res").model_dump(mode="json"), weights)
    client.__exit__(None, None, None)


def test_every_route_has_a_row(world: World) -> None:
    routes = {(m.upper(), p) for p, ops in world.client.app.openapi()["paths"].items() for m in ops}
    assert routes == set(MATRIX), (
        f"routes without a row: {routes - set(MATRIX)}; rows without a route: {set(MATRIX) - routes}"
    )


def test_the_http_workers_ask_a_key_where_the_routes_do(world: World) -> None:
    """The HTTP workers check the key before the inference process sees a request: the /v1 and /v2
    routes they let through without one are those whose OpenAPI operation declares no key."""
    from service.serve.front import KEYLESS, _needs_key

    ops = [(p, op) for p, item in world.client.app.openapi()["paths"].items() for op in item.values()]
    assert {p for p, op in ops if not op.get("security") and p.startswith(("/v1/", "/v2"))} == KEYLESS
    assert all(_needs_key(p) == bool(op.get("security")) for p, op in ops)


@pytest.mark.parametrize("who", WHO)
@pytest.mark.parametrize("route", list(MATRIX), ids=[f"{m} {p}" for m, p in MATRIX])
def test_authorization_matrix(world: World, route: tuple[str, str], who: str) -> None:
    make, expected = MATRIX[route]
    url, kwargs = make(world)
    key = world.keys[who]
    request = world.client.build_request(route[0], url, **kwargs)
    if key:
        request.headers["Authorization"] = f"Bearer {key}"
    else:
        del request.headers["Authorization"]  # the client's own (an admin's): none at all
    try:
        r = world.client.send(request)
    finally:
        if route == ("DELETE", "/v1/paths/{path_id}"):  # A's path back as it was, A its only owner
            assert world.client.post(
                "/v1/paths/import", content=world.bundle, headers={"Authorization": f"Bearer {world.keys['a']}"}
            ).status_code in (200, 201)
    want = expected[who]
    assert r.status_code in (want if isinstance(want, set) else {want}), f"{who}: {r.status_code} {r.text[:300]}"
    if r.status_code == 401:
        assert r.headers["www-authenticate"].startswith("Bearer")
    if key:
        assert key not in r.text  # a key never comes back, not even in an error


def test_a_tenant_lists_only_its_own(world: World) -> None:
    def listed(who: str, what: str) -> set[str]:
        return {
            i["id"]
            for i in world.client.get(what, headers={"Authorization": f"Bearer {world.keys[who]}"}).json()["items"]
        }

    assert world.job in listed("a", "/v1/jobs") and world.job not in listed("b", "/v1/jobs")
    assert world.dataset in listed("a", "/v1/datasets") and world.dataset not in listed("b", "/v1/datasets")
    assert "digits" in listed("b", "/v1/datasets")  # built-in datasets are everyone's
    assert world.job in listed("admin", "/v1/jobs") and world.dataset in listed("admin", "/v1/datasets")


def test_sharing_a_path(world: World) -> None:
    """B gets A's path when A grants it to B or makes it public, and loses it when A takes it back;
    B may read and predict it but not delete or share it."""
    as_a, as_b = ({"Authorization": f"Bearer {world.keys[t]}"} for t in ("a", "b"))
    c, url = world.client, f"/v1/paths/{world.path}"
    assert c.post("/v1/paths/import", content=world.bundle, headers=as_a).status_code in (200, 201)
    for sharing in ({"tenants": ["b"]}, {"public": True}):
        assert c.put(f"{url}/sharing", json=sharing, headers=as_a).status_code == 200
        assert c.post(f"{url}/predict", json=PREDICT, headers=as_b).status_code == 200
        assert world.path in {p["id"] for p in c.get("/v1/paths", headers=as_b).json()["items"]}
        assert c.delete(url, headers=as_b).status_code == 403
        assert c.put(f"{url}/sharing", json={}, headers=as_b).status_code == 403
    assert c.put(f"{url}/sharing", json={}, headers=as_a).json() == {"public": False, "tenants": [], "owners": ["a"]}
    assert c.get(url, headers=as_b).status_code == 404


def test_an_import_is_owned_by_each_importer(world: World) -> None:
    """The same bundle imported by A and B: one stored path, two owners; A deleting it leaves B's."""
    as_a, as_b = ({"Authorization": f"Bearer {world.keys[t]}"} for t in ("a", "b"))
    c, url = world.client, f"/v1/paths/{world.path}"
    c.post("/v1/paths/import", content=world.bundle, headers=as_a)
    assert c.post("/v1/paths/import", content=world.bundle, headers=as_b).status_code == 201
    assert c.get(f"{url}/sharing").json()["owners"] == ["a", "b"]
    assert c.delete(url, headers=as_a).status_code == 204
    assert c.get(url, headers=as_a).status_code == 404
    assert c.post(f"{url}/predict", json=PREDICT, headers=as_b).status_code == 200
    assert c.delete(url, headers=as_b).status_code == 204
    assert c.get(url).status_code == 404  # with its last owner, the path is gone (an admin sees no more)
    assert c.post("/v1/paths/import", content=world.bundle, headers=as_a).status_code == 201  # as it was


def test_a_reader_cannot_change_an_owners_grants(world: World) -> None:
    """B, granted A's path, exports and imports it: B owns it too, but A's grants stay A's: B can
    neither see them nor change them, and B's own grants go when B gives the path up."""
    as_a, as_b = ({"Authorization": f"Bearer {world.keys[t]}"} for t in ("a", "b"))
    c, url = world.client, f"/v1/paths/{world.path}"
    c.post("/v1/paths/import", content=world.bundle, headers=as_a)
    assert c.put(f"{url}/sharing", json={"tenants": ["b", "c"]}, headers=as_a).status_code == 200
    assert c.get(f"{url}/sharing", headers=as_b).status_code == 403  # a reader does not see them
    assert (
        c.post("/v1/paths/import", content=c.get(f"{url}/bundle", headers=as_b).content, headers=as_b).status_code
        == 201
    )
    assert c.get(f"{url}/sharing", headers=as_b).json() == {"public": False, "tenants": [], "owners": ["a", "b"]}
    assert c.put(f"{url}/sharing", json={"public": True}, headers=as_b).status_code == 200
    assert c.get(f"{url}/sharing", headers=as_a).json() == {
        "public": False,
        "tenants": ["b", "c"],
        "owners": ["a", "b"],
    }
    assert c.get(f"{url}/sharing").json()["public"] is True  # an admin sees every owner's grants
    assert c.delete(url, headers=as_b).status_code == 204  # b gives it up, and its grants go with it
    assert c.get(f"{url}/sharing").json() == {"public": False, "tenants": ["b", "c"], "owners": ["a"]}
    c.put(f"{url}/sharing", json={}, headers=as_a)


def test_a_tenant_composes_only_on_datasets_it_sees(world: World) -> None:
    as_b = {"Authorization": f"Bearer {world.keys['b']}"}
    spec = {"method": "reprogram", "base": "res", "task": {"dataset": world.dataset}, "train": {"epochs": 1}}
    r = world.client.post("/v1/compositions", json=spec, headers=as_b)
    assert r.status_code == 422 and f"no dataset {world.dataset!r}" in r.json()["detail"]


def test_expired_and_revoked_keys(world: World) -> None:
    """An expired key is refused; a key revoked after use is refused within the 2 s its check is cached."""
    import datetime as dt

    from service.common.edge import KEY_TTL_S
    from zoo_store.store.db import ApiKeyRow

    svc = world.client.app.state.services
    made = world.client.post("/v1/keys", json={"tenant": "d", "expires_in_days": 1}).json()
    as_d = {"Authorization": f"Bearer {made['key']}"}
    assert world.client.get("/v1/paths", headers=as_d).status_code == 200
    with svc.db.session() as s:
        s.get(ApiKeyRow, made["id"]).expires_at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    time.sleep(KEY_TTL_S + 0.1)
    assert world.client.get("/v1/paths", headers=as_d).status_code == 401

    made = world.client.post("/v1/keys", json={"tenant": "d"}).json()
    as_d = {"Authorization": f"Bearer {made['key']}"}
    assert world.client.post(f"/v1/paths/{world.path}/predict", json=PREDICT, headers=as_d).status_code == 404
    assert world.client.delete(f"/v1/keys/{made['id']}").json()["revoked_at"] is not None
    time.sleep(KEY_TTL_S + 0.1)
    for r in (
        world.client.get("/v1/paths", headers=as_d),
        world.client.post(f"/v1/paths/{world.path}/predict", json=PREDICT, headers=as_d),
    ):
        assert r.status_code == 401, r.text


def test_a_sign_in_token_is_exchanged_once_and_is_not_a_key(world: World) -> None:
    import datetime as dt

    from service.common.edge import KEY_TTL_S
    from zoo_store.store.db import ApiKeyRow

    made = world.client.post("/v1/keys/sign-in").json()
    token, svc = made["token"], world.client.app.state.services
    assert dt.datetime.fromisoformat(made["expires_at"]) - dt.datetime.now(dt.UTC) <= dt.timedelta(minutes=15)
    r = world.client.get("/v1/paths", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 401 and "sign-in token is not an API key" in r.json()["detail"]
    anyone = {"Authorization": ""}
    new = world.client.post("/v1/keys/exchange", json={"token": token}, headers=anyone)
    assert new.status_code == 201, new.text
    assert new.json()["admin"] and new.json()["tenant"] == "admin"
    assert dt.datetime.fromisoformat(new.json()["expires_at"]) > dt.datetime.now(dt.UTC) + dt.timedelta(days=6)
    assert world.client.get("/v1/keys", headers={"Authorization": f"Bearer {new.json()['key']}"}).status_code == 200
    again = world.client.post("/v1/keys/exchange", json={"token": token}, headers=anyone)
    assert again.status_code == 401 and "used or expired" in again.json()["detail"]

    late = world.client.post("/v1/keys/sign-in").json()
    with svc.db.session() as s:
        s.get(ApiKeyRow, _key_id(world, late["token"])).expires_at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    time.sleep(KEY_TTL_S + 0.1)
    assert world.client.post("/v1/keys/exchange", json={"token": late["token"]}).status_code == 401
    for body in ({"token": world.keys["a"]}, {"token": "zoo_nonsense"}):  # a tenant's key is not a token
        assert world.client.post("/v1/keys/exchange", json=body).status_code == 401
    assert world.client.post("/v1/keys/exchange", json={"token": 7}).status_code == 422
    r = world.client.post("/v1/keys", json={"tenant": "sign-in", "admin": True})
    assert r.status_code == 422 and "sign-in tokens" in r.json()["detail"]
    _, legacy = svc.auth.keys._add("sign-in", False, None)  # a key an earlier release made for a tenant of that name
    assert world.client.post("/v1/keys/exchange", json={"token": legacy}).status_code == 401
    rows = world.client.get("/v1/audit", params={"limit": 200}).json()["items"]
    spent = [r for r in rows if r["route"] == "/v1/keys/exchange" and r["status"] == 201]
    assert any(r["key_id"] == _key_id(world, token) and r["target"] == new.json()["id"] for r in spent), spent


def _key_id(world: World, key: str) -> str:
    prefix = key.split("_")[1]
    return next(k["id"] for k in world.client.get("/v1/keys").json()["items"] if k["prefix"] == prefix)


def test_auth_off(tmp_path: Path) -> None:
    """ZOO_AUTH=off: no key needed anywhere, every caller an admin, and /readyz says so."""
    client = start_app(make_settings(tmp_path, auth=False))
    try:
        assert not (tmp_path / "admin.key").exists()
        assert client.get("/readyz").json()["auth"].startswith("off")
        assert client.get("/v1/keys").status_code == 200 and client.get("/v1/paths").status_code == 200
        assert client.post("/v1/keys/sign-in").status_code == 201  # a token minted with auth off...
    finally:
        client.__exit__(None, None, None)
    on = start_app(make_settings(tmp_path))  # ...is no key: the first start with auth on writes admin.key
    try:
        assert (tmp_path / "admin.key").exists()
    finally:
        on.__exit__(None, None, None)


def test_the_first_start_writes_an_admin_key(tmp_path: Path) -> None:
    client = start_app(make_settings(tmp_path))
    try:
        key_file = tmp_path / "admin.key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert client.get("/readyz").json()["auth"] == "on"
        assert client.get("/v1/keys").json()["items"][0]["admin"] is True
    finally:
        client.__exit__(None, None, None)
    key_file.unlink()
    again = start_app(make_settings(tmp_path))  # keys exist: no second admin key is made
    try:
        assert not key_file.exists() and len(again.get("/v1/keys", headers=client.headers).json()["items"]) == 1
    finally:
        again.__exit__(None, None, None)


def test_keys_create_offline_gets_an_admin_back_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every admin key lost: `zoo keys create --offline` writes one straight into the database."""
    from typer.testing import CliRunner

    from service import cli

    settings = make_settings(tmp_path)
    client = start_app(settings)
    try:
        (tmp_path / "admin.key").unlink()
        monkeypatch.setenv("ZOO_DATA_DIR", str(tmp_path))
        out = CliRunner().invoke(cli.app, ["keys", "create", "--tenant", "ops", "--admin", "--offline"])
        assert out.exit_code == 0, out.output
        key = out.stdout.strip().splitlines()[0]
        assert client.get("/v1/keys", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        bad = CliRunner().invoke(cli.app, ["keys", "create", "--tenant", "Not Valid", "--offline"])
        assert bad.exit_code == 2 and "tenant" in bad.output
    finally:
        client.__exit__(None, None, None)


@pytest.mark.parametrize(
    ("method", "url", "body"),
    [
        ("POST", "/v1/keys", {"tenant": "Not Valid"}),
        ("POST", "/v1/keys", {"tenant": "a", "admin": "yes"}),
        ("POST", "/v1/keys", {"tenant": "a", "expires_in_days": 0}),
        ("POST", "/v1/keys", {"tenant": "a", "scope": "all"}),
        ("POST", "/v1/keys", {"tenant": "admin"}),  # kept for admins' keys
        ("PUT", "/v1/paths/{path}/sharing", {"tenants": ["BAD!"]}),
        ("PUT", "/v1/paths/{path}/sharing", {"public": "yes"}),
        ("PUT", "/v1/tenants/a/limits", {"predict_rate": 0}),
        ("PUT", "/v1/tenants/a/limits", {"max_jobs": 1.5}),
        ("PUT", "/v1/tenants/a/limits", {"max_gpus": 1}),
        ("PUT", "/v1/tenants/BAD!/limits", {}),
        ("GET", "/v1/tenants/BAD!", None),
        ("GET", "/v1/audit?tenant=BAD!", None),
    ],
)
def test_bad_input_to_the_tenancy_routes_is_422_and_writes_nothing(
    world: World, method: str, url: str, body: dict | None
) -> None:
    before = (
        world.client.get("/v1/keys").json(),
        world.client.get(f"/v1/paths/{world.path}/sharing").json(),
        world.client.get("/v1/tenants/a").json(),
    )
    r = world.client.request(method, url.replace("{path}", world.path), json=body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"]
    after = (
        world.client.get("/v1/keys").json(),
        world.client.get(f"/v1/paths/{world.path}/sharing").json(),
        world.client.get("/v1/tenants/a").json(),
    )
    assert after == before


def test_revoking_an_unknown_key_is_404(world: World) -> None:
    r = world.client.delete("/v1/keys/key_nope")
    assert r.status_code == 404 and "no key" in r.json()["detail"]
