"""Tenants' limits: the predict rate (429 with Retry-After, per tenant: one over its rate does not
slow another), quotas (403 naming the limit), the audit log, and no key, hash or token anywhere it
could leak (logs, error bodies, metrics, the audit log)."""

from __future__ import annotations

import hashlib
import io
import re
import statistics
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from bench.scale import make_paths
from service.api.quotas import MemoryBuckets, RedisBuckets
from tests.conftest import make_settings, start_app, tiny_card, tiny_weights
from tests.helpers import SMALL_TASK, tensor_inputs

PREDICT = {"inputs": tensor_inputs(1)}


@pytest.fixture
def zoo(tmp_path) -> Iterator[tuple[TestClient, dict[str, dict[str, str]], str, bytes]]:
    """An app with one base, tenants a and b (their auth headers) and a path both may predict."""
    client = start_app(make_settings(tmp_path))
    svc = client.app.state.services
    card, _ = svc.store.add_base(tiny_card("res"), tiny_weights("resnet_s", 10))
    svc.zoo.add(card)
    who = {t: {"Authorization": f"Bearer {client.post('/v1/keys', json={'tenant': t}).json()['key']}"} for t in "ab"}
    bundles = make_paths(svc.store, "res", 2)
    path = client.post("/v1/paths/import", content=bundles[0], headers=who["a"]).json()["id"]
    assert client.put(f"/v1/paths/{path}/sharing", json={"public": True}, headers=who["a"]).status_code == 200
    yield client, who, path, bundles[1]
    client.__exit__(None, None, None)


def _npz(n: int) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((n, 28, 28), np.uint8), y=np.arange(n) % 2)
    return buf.getvalue()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def buckets(request):
    if request.param == "memory":
        return MemoryBuckets()
    return RedisBuckets(request.getfixturevalue("redis_url"), prefix=f"zoo:test:{uuid.uuid4().hex}:")


def test_token_bucket(buckets) -> None:
    assert [buckets.take("t", rate=10.0, burst=3) for _ in range(3)] == [0.0, 0.0, 0.0]  # the burst
    wait = buckets.take("t", rate=10.0, burst=3)
    assert 0 < wait <= 0.1 + 1e-6  # one token in a tenth of a second
    assert buckets.take("other", rate=10.0, burst=3) == 0.0  # each tenant its own bucket
    time.sleep(0.12)
    assert buckets.take("t", rate=10.0, burst=3) == 0.0


@pytest.mark.redis
def test_replicas_share_one_bucket(redis_url: str) -> None:
    """Two replicas' buckets in Redis are one: the burst is spent across both."""
    prefix = f"zoo:test:{uuid.uuid4().hex}:"
    one, two = RedisBuckets(redis_url, prefix), RedisBuckets(redis_url, prefix)
    taken = [b.take("t", rate=1.0, burst=4) == 0.0 for b in (one, two, one, two, one, two)]
    assert taken == [True, True, True, True, False, False]


def test_a_burst_over_the_rate_is_refused_and_the_other_tenant_is_not_slowed(zoo) -> None:
    client, who, path, _ = zoo
    rate, burst = 1.0, 5  # slow enough that any machine sends faster
    assert client.put("/v1/tenants/a/limits", json={"predict_rate": rate, "predict_burst": burst}).status_code == 200

    def call(tenant: str) -> tuple[int, float, str | None]:
        t = time.perf_counter()
        r = client.post(f"/v1/paths/{path}/predict", json=PREDICT, headers=who[tenant])
        return r.status_code, time.perf_counter() - t, r.headers.get("retry-after")

    alone = [call("b")[1] for _ in range(10)]
    start = time.perf_counter()
    a_calls, b_calls = [], []
    for i in range(80):  # a bursts; b keeps its pace in between
        a_calls.append(call("a"))
        if i % 8 == 0:
            b_calls.append(call("b"))
    seconds = time.perf_counter() - start
    a_ok = sum(s == 200 for s, _, _ in a_calls)
    refused = [(s, retry) for s, _, retry in a_calls if s != 200]
    assert refused and all(s == 429 and retry is not None and int(retry) >= 1 for s, retry in refused)
    assert a_ok <= burst + rate * seconds + 1  # a got no more than its bucket gives
    assert all(s == 200 for s, _, _ in b_calls)  # b is under its (default) rate: never refused
    during = statistics.median(t for _, t, _ in b_calls)
    assert during < 2 * statistics.median(alone) + 0.02  # and not slowed by a's refusals
    print(
        f"a: {a_ok} of {len(a_calls)} accepted in {seconds:.2f} s ({a_ok / seconds:.1f}/s, limit {rate:g}/s + "
        f"{burst}); b: {len(b_calls)} of {len(b_calls)} ({len(b_calls) / seconds:.1f}/s), median "
        f"{1e3 * during:.1f} ms vs {1e3 * statistics.median(alone):.1f} ms alone"
    )
    problem = client.post(f"/v1/paths/{path}/predict", json=PREDICT, headers=who["a"]).json()
    assert "predict rate" in problem["detail"] and problem["status"] == 429


def test_quotas_are_403_naming_the_limit(zoo) -> None:
    client, who, _, other = zoo
    limits = {"max_jobs": 0, "max_paths": 1, "max_dataset_bytes": 1000}
    assert client.put("/v1/tenants/a/limits", json=limits).json()["limits"]["max_jobs"] == 0
    spec = {"method": "reprogram", "base": "res", "task": SMALL_TASK, "train": {"epochs": 1}}
    for r, limit in (
        (client.post("/v1/compositions", json=spec, headers=who["a"]), "max_jobs"),
        (client.post("/v1/paths/import", content=other, headers=who["a"]), "max_paths"),
        (client.post("/v1/datasets", files={"file": ("d.npz", _npz(4))}, headers=who["a"]), "max_dataset_bytes"),
    ):
        assert r.status_code == 403 and limit in r.json()["detail"], r.text
    assert client.post("/v1/paths/import", content=other, headers=who["b"]).status_code == 201  # b: defaults
    assert client.post("/v1/paths/import", content=other).status_code == 201  # an admin: no limits
    usage = client.get("/v1/tenants/a").json()["usage"]
    assert (
        usage == {"jobs": 0, "paths": 1, "path_bytes": usage["path_bytes"], "dataset_bytes": 0}
        and usage["path_bytes"] > 0
    )
    assert client.put("/v1/tenants/a/limits", json={}).json()["limits"]["max_jobs"] == 8  # back to the default
    assert client.put("/v1/tenants/a/limits", json={"max_jobs": -1}).status_code == 422


def test_the_audit_log(zoo) -> None:
    client, who, path, other = zoo
    client.post("/v1/paths/import", content=other, headers=who["b"])
    client.delete(f"/v1/paths/{path}", headers=who["b"])  # b only reads it: 403, audited too
    client.post("/v1/keys", json={"tenant": "c"}, headers={"Authorization": "Bearer nope"})  # 401
    client.post(f"/v1/paths/{path}/predict", json=PREDICT, headers=who["b"])  # a read: not audited
    rows = client.get("/v1/audit").json()["items"]
    seen = [(r["tenant"], r["method"], r["route"], r["status"]) for r in rows]
    assert ("b", "POST", "/v1/paths/import", 201) in seen and ("b", "DELETE", "/v1/paths/{path_id}", 403) in seen
    assert (None, "POST", "/v1/keys", 401) in seen
    assert not any(r["route"].endswith("/predict") for r in rows)
    made = next(r for r in rows if r["route"] == "/v1/paths/import" and r["tenant"] == "b")
    assert made["target"].startswith("p_") and made["key_id"].startswith("key_")
    assert {r["tenant"] for r in client.get("/v1/audit", params={"tenant": "b"}).json()["items"]} == {"b"}
    assert client.get("/v1/audit", headers=who["a"]).status_code == 403


def test_each_audit_row_names_what_the_call_acted_on(zoo) -> None:
    """The target: what a POST made (the id it answers with), else the id in the path; none when refused."""
    import json

    from safetensors.torch import save

    client, who, path, other = zoo
    spec = {"method": "reprogram", "base": "res", "task": SMALL_TASK, "train": {"epochs": 1}}
    card = tiny_card("res2").model_dump(mode="json")
    key = client.post("/v1/keys", json={"tenant": "c"}).json()["id"]
    weights = {"weights": ("w.safetensors", save(tiny_weights("resnet_s", 10)))}
    answers = {
        "POST /v1/paths/import": client.post("/v1/paths/import", content=other, headers=who["b"]),
        "POST /v1/datasets": client.post("/v1/datasets", files={"file": ("d.npz", _npz(12))}),
        "POST /v1/compositions": client.post("/v1/compositions", json=spec, headers=who["a"]),
        "POST /v1/zoo/models": client.post("/v1/zoo/models", data={"card": json.dumps(card)}, files=weights),
    }
    made = {
        "POST /v1/keys": key,
        **{route: r.json()["id"] for route, r in answers.items()},
        "PUT /v1/paths/{path_id}/sharing": path,
        "PUT /v1/tenants/{tenant}/limits": "c",
        "DELETE /v1/keys/{key_id}": key,
    }
    assert client.put(f"/v1/paths/{path}/sharing", json={"public": True}, headers=who["a"]).status_code == 200
    assert client.put("/v1/tenants/c/limits", json={}).status_code == 200
    assert client.delete(f"/v1/keys/{key}").status_code == 200
    assert client.post("/v1/compositions", json={**spec, "base": "nope"}, headers=who["b"]).status_code == 422
    rows = client.get("/v1/audit").json()["items"]
    targets = {f"{r['method']} {r['route']}": r["target"] for r in rows if r["status"] < 300}
    assert {k: targets.get(k) for k in made} == made
    refused = [r for r in rows if r["route"] == "/v1/compositions" and r["status"] == 422]
    assert [r["target"] for r in refused] == [None]


def test_no_key_or_hash_leaks(tmp_path) -> None:
    """Through a live `zoo serve`: the keys of good and bad requests, and their hashes, appear in no
    log line, error body, metric or audit row; the sign-in token the start printed, once, only there."""
    from bench.scale import Server

    server = Server(tmp_path, "mixed", workers=1)
    try:
        link = re.search(r"(http://\S+)/#token=(\S+)", server.log.read_text(errors="replace"))
        assert link and link.group(1) == server.url, server.log.read_text(errors="replace")[-2000:]
        token = link.group(2)
        signed_in = server.client.post("/v1/keys/exchange", json={"token": token}).json()["key"]
        made = server.client.post("/v1/keys", json={"tenant": "a"}).json()
        bad = made["key"][:-4] + "AAAA"
        secrets = [server.key, made["key"], bad, signed_in]
        secrets += [hashlib.sha256(k.encode()).hexdigest() for k in [*secrets, token]]
        answers = [server.client.get("/v1/paths", headers={"Authorization": f"Bearer {k}"}) for k in (made["key"], bad)]
        answers += [
            server.client.post("/v1/compositions", json={}, headers={"Authorization": f"Bearer {bad}"}),
            server.client.post("/v1/keys/exchange", json={"token": token}),  # used: 401
            server.client.get("/metrics"),
            server.client.get("/v1/audit"),
            server.client.get("/v1/keys"),
        ]
        assert [r.status_code for r in answers] == [200, 401, 401, 401, 200, 200, 200]
        time.sleep(0.5)  # the log file flushed
        texts = [r.text for r in answers] + [server.log.read_text(errors="replace")]
        assert not [s for s in secrets for t in texts if s in t]
        assert sum(t.count(token) for t in texts) == 1  # the start's line
    finally:
        server.close()
