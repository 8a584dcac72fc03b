"""A rolling restart under wrk (issue 33, point 2): two replicas (`zoo serve`, distributed mode, 1 HTTP
worker each, each on a fixed port) on one PostgreSQL and Redis behind nginx with deploy/nginx.conf; wrk
sends `.npy` predicts of one reprogram path through nginx while each replica in turn gets SIGTERM (its
supervisor only), exits, starts again on the same port and is ready. No request may fail."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from bench.cluster import BASE_ID, GRAY, NGINX, Cluster, Proc, tiny_base
from bench.http import WRK_SCRIPT
from bench.scale import free_port, make_paths, one_image
from zoo_store.store.blobs import DbBlobStore
from zoo_store.store.db import Database
from zoo_store.store.store import Store

pytestmark = [pytest.mark.postgres, pytest.mark.redis]
WRK = shutil.which("wrk") or "/usr/bin/wrk"
CONNECTIONS = int(os.environ.get("ZOO_TEST_ROLLING_CONNECTIONS", "8"))  # by hand: 16, as issue 33 asks
FAIL_TIMEOUT_S = 5  # bench.cluster's replicas.conf, like deploy/replicas.conf: max_fails=1 fail_timeout=5s
PREDICT_200 = re.compile(r'"POST /v1/paths/p_[0-9a-f]+/predict HTTP/1\.1" 200')


def start_replica(cluster: Cluster, name: str, port: int, start: int) -> Proc:
    """``zoo serve`` on ``port`` with its access log on; its log file is new for each ``start``."""
    log = cluster.root / f"{name}.start{start}.log"
    cmd = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as f:
        popen = subprocess.Popen(cmd, env=cluster.env(name), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    cluster.procs[name] = Proc(name, popen, log, f"http://127.0.0.1:{port}")
    return cluster.procs[name]


def wait_ready(p: Proc, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(p.url + "/readyz", timeout=2).status_code == 200:
                return
        assert p.alive(), f"{p.name} exited: {p.tail()}"
        assert time.monotonic() < end, f"{p.name} not ready after {timeout} s: {p.tail()}"
        time.sleep(0.1)


def wait_gone(p: Proc, timeout: float = 40) -> None:
    """The supervisor exited, and every process it started (its session) too."""
    p.popen.wait(timeout)
    end = time.monotonic() + timeout
    while True:
        try:
            os.killpg(p.popen.pid, 0)
        except ProcessLookupError:
            return
        assert time.monotonic() < end, f"{p.name}'s children outlived it"
        time.sleep(0.05)


def parse_wrk(out: str) -> dict[str, int]:
    """wrk's summary: requests, non-2xx/3xx responses, socket errors (lines absent when 0)."""
    counts = {"requests": int(re.search(r"(\d+) requests in", out).group(1)), "non_2xx_3xx": 0}
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        counts["non_2xx_3xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    for i, kind in enumerate(("connect", "read", "write", "timeout")):
        counts[kind] = int(m.group(i + 1)) if m else 0
    return counts


def test_rolling_restart_under_wrk(pg_url_fresh: str, redis_url: str, tmp_path: Path) -> None:
    assert Path(NGINX).exists() and Path(WRK).exists(), "needs nginx and wrk (apt-get install nginx wrk)"
    cluster = Cluster(tmp_path, pg_url_fresh, redis_url)
    ports = {"replica0": free_port(), "replica1": free_port()}
    starts = {name: 0 for name in ports}
    wrk = None
    try:
        for name, port in ports.items():
            start_replica(cluster, name, port, 0)
        for name in ports:
            wait_ready(cluster.procs[name])
        nginx = cluster.nginx("nginx", list(ports))
        cluster.wait_ready()
        card, weights = tiny_base()
        _, created = cluster.client("replica0").add_model(card, weights)
        assert created
        db = Database(pg_url_fresh)
        (bundle,) = make_paths(Store(db, DbBlobStore(db)), BASE_ID, 1)
        db.dispose()
        path_id = cluster.client("nginx").import_bundle(bundle)[0]["id"]
        for name in ports:  # both replicas follow the zoo: the base is loaded on each
            end = time.monotonic() + 30
            while httpx.get(cluster.procs[name].url + "/readyz", timeout=5).json()["zoo_version"] != 1:
                assert time.monotonic() < end, f"{name} did not load the base"
                time.sleep(0.1)
        _, body = one_image(GRAY)
        for name in ports:  # the path materialized on each replica (the one nginx hashes it to, and the other)
            r = httpx.post(
                f"{cluster.procs[name].url}/v1/paths/{path_id}/predict",
                content=body,
                timeout=30,
                headers={"content-type": "application/octet-stream", "authorization": f"Bearer {cluster.admin_key}"},
            )
            assert r.status_code == 200, r.text

        (tmp_path / "paths.txt").write_text(path_id + "\n")
        (tmp_path / "body").write_bytes(body)
        (tmp_path / "zoo.lua").write_text(WRK_SCRIPT)
        env = {
            **os.environ,
            "ZOO_WRK_PATHS": str(tmp_path / "paths.txt"),
            "ZOO_WRK_BODY": str(tmp_path / "body"),
            "ZOO_WRK_TYPE": "application/octet-stream",
            "ZOO_WRK_AUTH": f"Bearer {cluster.admin_key}",
            "ZOO_WRK_ROUTE": "/v1/paths/%s/predict",
        }
        # at most 60 s; stopped with SIGINT (wrk then prints its summary) once the second replica is back
        cmd = [WRK, "-t1", f"-c{CONNECTIONS}", "-d60s", "--timeout", "10s", "-s", str(tmp_path / "zoo.lua"), nginx.url]
        wrk = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        began = time.monotonic()
        time.sleep(2)
        timings = {}
        for name, port in ports.items():
            old = cluster.procs[name]
            t = time.monotonic()
            os.kill(old.popen.pid, signal.SIGTERM)  # the supervisor only: it drains its workers, then inference
            wait_gone(old)
            exited = time.monotonic() - t
            starts[name] += 1
            wait_ready(start_replica(cluster, name, port, starts[name]))
            timings[name] = {"exit_s": round(exited, 1), "back_s": round(time.monotonic() - t, 1)}
            # nginx tries a replica it marked failed (a refused connection, a 503 while it loaded) again after
            # fail_timeout (5 s): stopping the other before then leaves it no live replica (502s) for that long
            time.sleep(FAIL_TIMEOUT_S + 1)
        wrk.send_signal(signal.SIGINT)
        out, _ = wrk.communicate(timeout=30)
        seconds = time.monotonic() - began
        counts = parse_wrk(out)
        served = {
            name: sum(
                len(PREDICT_200.findall(log.read_text(errors="replace"))) for log in tmp_path.glob(f"{name}.start*.log")
            )
            for name in ports
        }
        print(
            f"\nrolling restart: {seconds:.1f} s of wrk at {CONNECTIONS} connections through nginx: {counts}; "
            f"predicts answered 200 by each replica (access logs): {served}; restarts: {timings}"
        )
        print(out)
        for log in sorted(tmp_path.glob("*.log")):
            statuses = re.findall(r'"(?:GET|POST) (\S+) HTTP/1\.1" (\d+)', log.read_text(errors="replace"))
            print(log.name, {s: statuses.count(s) for s in set(statuses) if s[1] != "200"})
        print(nginx.tail())
    except BaseException:
        for p in cluster.procs.values():
            print(f"--- {p.name} ---\n{p.tail()}")
        raise
    finally:
        if wrk is not None and wrk.poll() is None:
            wrk.kill()
            wrk.wait()
        cluster.close()
    assert counts["requests"] > 0
    failed = {k: v for k, v in counts.items() if k != "requests" and v}
    assert not failed, f"wrk saw failures during the rolling restart: {counts}"
    assert all(served.values()), f"a replica answered no predict: {served}"
