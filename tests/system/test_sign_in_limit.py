"""The sign-in exchange (``POST /v1/keys/exchange``) takes no key. deploy/nginx.conf, which knows each
client's address, holds each address to 1 exchange a second with bursts of 20 (429 beyond, as a
problem+json); the replica behind it has no limit of its own (it would see only nginx's address)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from bench.cluster import NGINX, Cluster

BURST = 20  # deploy/nginx.conf: limit_req zone=zoo_sign_in burst=20 nodelay (rate 1r/s)


def _exchanges(client: httpx.Client, n: int) -> list[httpx.Response]:
    return [client.post("/v1/keys/exchange", json={"token": "zoo_nonsense"}) for _ in range(n)]


def test_nginx_limits_sign_in_exchanges_per_address(pg_url_fresh: str, redis_url: str, tmp_path: Path) -> None:
    assert Path(NGINX).exists(), "needs nginx (apt-get install nginx)"
    cluster = Cluster(tmp_path, pg_url_fresh, redis_url)
    try:
        cluster.replica("replica0")
        cluster.nginx("nginx", ["replica0"])
        cluster.wait_ready()
        with (
            httpx.Client(base_url=cluster.procs["nginx"].url, timeout=30) as proxy,
            httpx.Client(base_url=cluster.procs["replica0"].url, timeout=30) as direct,
        ):
            through = _exchanges(proxy, BURST + 20)
            codes = [r.status_code for r in through]
            assert codes[: BURST + 1] == [401] * (BURST + 1), codes  # the first and the burst reach the replica
            assert set(codes) == {401, 429} and codes.count(429) >= 10, codes  # then about 1 a second
            refused = next(r for r in through if r.status_code == 429)
            assert refused.headers["content-type"] == "application/problem+json"
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["status"] == 429 and "too many sign-in exchanges" in refused.json()["detail"]
            assert {r.status_code for r in _exchanges(direct, BURST + 20)} == {401}  # no limit behind nginx

            admin = {"Authorization": f"Bearer {cluster.admin_key}"}
            token = direct.post("/v1/keys/sign-in", headers=admin).json()["token"]
            time.sleep(1.1)  # a whole request back in this address's bucket
            made = proxy.post("/v1/keys/exchange", json={"token": token})
            assert made.status_code == 201 and made.json()["admin"], made.text
    finally:
        cluster.close()
