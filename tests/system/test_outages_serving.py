"""Issue 33, the serving half: a distributed-mode replica (`zoo serve`, 1 HTTP worker) on a
PostgreSQL and a Redis of the test's own (tests/system/outages.py), a tenant's warm predicts and a
route that needs the database under a bounded load while PostgreSQL restarts, PostgreSQL stops for
12 s, and Redis stops for 6 s. Each scenario counts the answers by status before, during and after
the fault, and asserts: no 500 (nor a dropped connection); warm predicts 200 throughout (the key,
the tenant's access and its limits served from the replica's caches, within ZOO_OUTAGE_STALE_S;
the rate limit from per-process buckets while Redis is away); what needs the database 503 with
Retry-After and a body that names no server; /readyz 200 with "degraded" naming what is away; a
revoked key refused within the caches' TTL once PostgreSQL is back; the log one line per outage,
no traceback. The figures are printed (pytest -s), and docs/deploy.md quotes them.

``python -m tests.system.test_outages_serving`` runs the same scenarios with wrk as the load
(16 connections, loopback, a few seconds a phase) and prints the status counts of each phase."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from safetensors.torch import save

from bench.scale import free_port, make_paths, one_image
from service.api.auth import KEY_TTL_S
from service.common.ttl import RETRY_S
from tests.conftest import GRAY, tiny_card, tiny_weights
from tests.system.outages import PrivatePostgres, PrivateRedis
from zoo_store.store.blobs import DbBlobStore
from zoo_store.store.db import Database
from zoo_store.store.store import Store

COMPOSE = {
    "method": "reprogram",
    "base": "res",
    "train": {"epochs": 1, "seed": 0},
    "task": {"dataset": "digits", "labels": ["0", "1", "2"], "samples_per_label": 8},
}
PREDICT_THREADS = 4
MAX_LOAD_S = 60  # every load stops by then, whatever happens
MAX_REQUESTS = 200_000


class Stack:
    """PostgreSQL and Redis of their own, a distributed-mode replica on them, a base, tenant "a" with
    two keys and four imported reprogram paths, each predicted once (warm)."""

    def __init__(self, root: Path):
        self.root, self.pg, self.redis, self.proc = root, None, None, None
        try:
            self._start()
        except BaseException:
            self.close()  # what did start is stopped
            raise

    def _start(self) -> None:
        root = self.root
        self.pg, self.redis = PrivatePostgres(), PrivateRedis()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        data = root / "replica"
        data.mkdir(parents=True)
        env = {
            **os.environ,
            "ZOO_MODE": "distributed",
            "ZOO_DATABASE_URL": self.pg.url,
            "ZOO_REDIS_URL": self.redis.url,
            "ZOO_DATA_DIR": str(data),
            "ZOO_DEMO_ZOO": "false",
            "ZOO_JOBS_STREAM": "zoo:outages",
            "ZOO_HTTP_WORKERS": "1",
            "ZOO_DEVICE": "cpu",
            "ZOO_ZOO_POLL_S": "0.5",
            "PYTHONUNBUFFERED": "1",
            "ZOO_TENANT_PREDICT_RATE": "100000",
            "ZOO_TENANT_PREDICT_BURST": "100000",
        }
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.log = root / "replica.log"
        cmd = [
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--no-access-log",
        ]
        with self.log.open("wb") as f:
            self.proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready(data)
        self.admin = httpx.Client(
            base_url=self.url,
            timeout=30,
            headers={"Authorization": f"Bearer {(data / 'admin.key').read_text().strip()}"},
        )
        card = tiny_card("res").model_dump(mode="json")
        r = self.admin.post(
            "/v1/zoo/models",
            data={"card": json.dumps(card)},
            files={"weights": ("w.safetensors", save(tiny_weights("resnet_s", 10)))},
        )
        assert r.status_code == 201, r.text
        self.key, self.spare = (self.admin.post("/v1/keys", json={"tenant": "a"}).json() for _ in range(2))
        db = Database(self.pg.url)
        bundles = make_paths(Store(db, DbBlobStore(db), None), "res", 4)
        db.dispose()
        self.tenant = self.client(self.key["key"])
        self.ids = [self.tenant.post("/v1/paths/import", content=b).json()["id"] for b in bundles]
        self.body = one_image(GRAY)[1]
        for path_id in self.ids:
            assert self.predict(self.tenant, path_id).status_code == 200

    def _wait_ready(self, data: Path, timeout: float = 180) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the replica exited: {self.tail()}")
            try:
                if (data / "admin.key").exists() and httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the replica was not ready within {timeout} s: {self.tail()}")

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, headers={"Authorization": f"Bearer {key}"})

    def predict(self, client: httpx.Client, path_id: str) -> httpx.Response:
        return client.post(
            f"/v1/paths/{path_id}/predict", content=self.body, headers={"content-type": "application/octet-stream"}
        )

    def tail(self, n: int = 4000) -> str:
        log = getattr(self, "log", None)
        return log.read_text(errors="replace")[-n:] if log is not None and log.exists() else ""

    def close(self) -> None:
        for c in (getattr(self, "admin", None), getattr(self, "tenant", None)):
            if c is not None:
                c.close()
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(30)
        for server in (self.pg, self.redis):
            if server is not None:
                server.close()


@dataclass
class Answer:
    at: float  # time.monotonic()
    kind: str  # predict | db (GET /v1/paths/{id}: needs the database) | ready (/readyz)
    status: int  # 0: no answer (the connection failed)
    retry_after: str | None = None
    body: str = ""


@dataclass
class Load:
    """``PREDICT_THREADS`` closed loops of a tenant's warm predicts over the paths, and a prober of a
    route that needs the database (every 0.1 s) and of /readyz (every 0.25 s), each on keep-alive
    connections, until stopped (at most ``MAX_LOAD_S`` and ``MAX_REQUESTS``)."""

    stack: Stack
    answers: list[Answer] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        self.t0 = time.monotonic()
        self.threads = [threading.Thread(target=self._predicts, args=(i,)) for i in range(PREDICT_THREADS)]
        self.threads.append(threading.Thread(target=self._probes))
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def _running(self) -> bool:
        return not self.stop.is_set() and time.monotonic() - self.t0 < MAX_LOAD_S and len(self.answers) < MAX_REQUESTS

    def _record(self, kind: str, call: Callable[[], httpx.Response]) -> None:
        try:
            r = call()
            self.answers.append(Answer(time.monotonic(), kind, r.status_code, r.headers.get("retry-after"), r.text))
        except httpx.TransportError as e:
            self.answers.append(Answer(time.monotonic(), kind, 0, body=repr(e)))

    def _predicts(self, i: int) -> None:
        with httpx.Client(base_url=self.stack.url, timeout=30, headers=dict(self.stack.tenant.headers)) as c:
            n = i
            while self._running():
                self._record("predict", lambda n=n: self.stack.predict(c, self.stack.ids[n % len(self.stack.ids)]))
                n += 1

    def _probes(self) -> None:
        with httpx.Client(base_url=self.stack.url, timeout=30, headers=dict(self.stack.tenant.headers)) as c:
            n = 0
            while self._running():
                self._record("db", lambda: c.get(f"/v1/paths/{self.stack.ids[0]}"))
                if n % 3 == 0:
                    self._record("ready", lambda: c.get("/readyz"))
                n += 1
                time.sleep(0.1)


@dataclass
class Figures:
    """The answers of one scenario by phase: before the fault, during it, after it healed."""

    name: str
    fault_at: float
    healed_at: float
    answers: list[Answer]
    extra: dict = field(default_factory=dict)

    def phase(self, a: Answer) -> str:
        return "before" if a.at < self.fault_at else "during" if a.at <= self.healed_at else "after"

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, Counter] = {p: Counter() for p in ("before", "during", "after")}
        for a in self.answers:
            out[self.phase(a)][f"{a.kind} {a.status}"] += 1
        return {p: dict(sorted(c.items())) for p, c in out.items()}

    def of(self, kind: str, phase: str | None = None) -> list[Answer]:
        return [a for a in self.answers if a.kind == kind and (phase is None or self.phase(a) == phase)]

    def recovered_s(self, ok: Callable[[Answer], bool], kind: str = "db") -> float | None:
        """Seconds from the heal to the first answer of ``kind`` after which every one is ``ok``."""
        after = self.of(kind, "after")
        for i, a in enumerate(after):
            if all(ok(b) for b in after[i:]):
                return round(a.at - self.healed_at, 2)
        return None

    def report(self) -> dict:
        statuses = Counter(a.status for a in self.answers)
        return {
            "scenario": self.name,
            "fault_s": round(self.healed_at - self.fault_at, 2),
            "answers": len(self.answers),
            "500": statuses[500],
            "no answer": statuses[0],
            "by phase": self.counts(),
            **self.extra,
        }


def scenario(
    stack: Stack,
    name: str,
    fault: Callable[[], None],
    heal: Callable[[], None],
    hold_s: float,
    during: Callable[[], dict] = dict,
    before_s: float = 2.0,
    after_s: float = 5.0,
) -> Figures:
    """Load, then ``fault()``, ``during()`` (its figures kept) for at least ``hold_s``, ``heal()``, more load."""
    with Load(stack) as load:
        time.sleep(before_s)
        fault_at = time.monotonic()
        fault()
        extra = during()
        time.sleep(max(0.0, fault_at + hold_s - time.monotonic()))
        heal()
        healed_at = time.monotonic()
        time.sleep(after_s)
    fig = Figures(name, fault_at, healed_at, load.answers, extra)
    print(f"\noutage figures: {json.dumps(fig.report())}")
    return fig


def _assert_served(fig: Figures, stack: Stack) -> None:
    """No 500 and no dropped connection anywhere; every warm predict 200; the database route 200 or
    503 with Retry-After and a body naming no server."""
    bad = [a for a in fig.answers if a.status in (0, 500)]
    assert not bad, (fig.report(), bad[:3], stack.tail())
    predicts = Counter(a.status for a in fig.of("predict"))
    assert set(predicts) == {200} and predicts[200] > 100, fig.report()
    for a in fig.of("db"):
        assert a.status in (200, 503), (a, fig.report())
        if a.status == 503:
            assert a.retry_after == "2" and str(stack.pg.port) not in a.body and "127.0.0.1" not in a.body, a
            assert "psycopg" not in a.body.lower() and "connection" not in a.body.lower(), a
    assert "Traceback" not in stack.log.read_text(errors="replace"), stack.tail()


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    root = Path(tempfile.mkdtemp(prefix="zoo-outages-"))
    s = None
    try:
        s = Stack(root)
        yield s
    finally:
        if s is not None:
            s.close()
        shutil.rmtree(root, ignore_errors=True)


def _log_lines(stack: Stack, text: str) -> int:
    """Lines of the replica's log that say an outage began (not that one ended)."""
    lines = stack.log.read_text(errors="replace").splitlines()
    return sum(text in line and ": over after" not in line for line in lines)


def test_postgresql_restarted_under_load(stack: Stack) -> None:
    fig = scenario(stack, "PostgreSQL restarted", stack.pg.restart, lambda: None, hold_s=0.0)
    _assert_served(fig, stack)
    recovered = fig.recovered_s(lambda a: a.status == 200)
    assert recovered is not None and recovered < 5, fig.report()
    print(f"outage figures: PostgreSQL restarted: the database route all 200 again {recovered} s after the restart")


def test_postgresql_stopped_for_12_s_under_load(stack: Stack) -> None:
    spare = stack.client(stack.spare["key"])
    assert stack.predict(spare, stack.ids[1]).status_code == 200  # known to the replica before the outage
    lines = _log_lines(stack, "database unreachable:")

    def during() -> dict:
        time.sleep(KEY_TTL_S + 1)  # past every cache's TTL: what follows is served stale
        r = stack.admin.post("/v1/compositions", json=COMPOSE)
        ready = httpx.get(f"{stack.url}/readyz", timeout=10)
        spare_status = stack.predict(spare, stack.ids[1]).status_code
        return {
            "compose": r.status_code,
            "compose retry-after": r.headers.get("retry-after"),
            "compose body": r.json().get("detail"),
            "readyz": [ready.status_code, ready.json().get("degraded")],
            "spare key predict": spare_status,
        }

    fig = scenario(stack, "PostgreSQL stopped for 12 s", stack.pg.stop, stack.pg.start, hold_s=12.0, during=during)
    _assert_served(fig, stack)
    x = fig.extra
    assert x["compose"] == 503 and x["compose retry-after"] == "2" and "database" in x["compose body"], x
    assert x["readyz"][0] == 200 and "database" in x["readyz"][1] and x["spare key predict"] == 200, x
    db_during = Counter(a.status for a in fig.of("db", "during"))
    assert db_during[503] > 20, fig.report()  # asked after its TTL: not served from a cache
    assert all(a.status == 200 for a in fig.of("db", "before")), fig.report()
    degraded = [a for a in fig.of("ready", "during") if '"database"' in a.body]
    assert degraded and all(a.status == 200 for a in fig.of("ready")), fig.report()
    recovered = fig.recovered_s(lambda a: a.status == 200)
    assert recovered is not None and recovered < 5, fig.report()
    ready_again = fig.recovered_s(lambda a: '"status":"ready"' in a.body, kind="ready")
    assert ready_again is not None and ready_again < 5, fig.report()
    # one warning when it began (and one when it ended), from the one process that met it (the inference process)
    assert _log_lines(stack, "database unreachable:") - lines == 1, stack.tail()

    # a key revoked once PostgreSQL is back is refused within the caches' TTL
    assert stack.admin.delete(f"/v1/keys/{stack.spare['id']}").status_code in (200, 204)
    revoked_at, status = time.monotonic(), 200
    while status == 200 and time.monotonic() - revoked_at < 30:
        status = stack.predict(spare, stack.ids[1]).status_code
        time.sleep(0.05)
    refused_after = round(time.monotonic() - revoked_at, 2)
    print(
        f"outage figures: database route all 200 again {recovered} s after the start, /readyz 'ready' "
        f"{ready_again} s; a key revoked after it was refused after {refused_after} s"
    )
    assert status == 401 and refused_after <= 2 * KEY_TTL_S + RETRY_S + 1, (status, refused_after)
    spare.close()


def test_redis_stopped_for_6_s_under_load(stack: Stack) -> None:
    lines = _log_lines(stack, "Redis unreachable:")

    def during() -> dict:
        time.sleep(1.5)
        r = stack.admin.post("/v1/compositions", json=COMPOSE)
        return {"compose": r.status_code, "compose retry-after": r.headers.get("retry-after")}

    fig = scenario(stack, "Redis stopped for 6 s", stack.redis.stop, stack.redis.start, hold_s=6.0, during=during)
    _assert_served(fig, stack)
    assert all(a.status == 200 for a in fig.of("db")), fig.report()  # the database route never needed Redis
    assert fig.extra == {"compose": 503, "compose retry-after": "5"}, fig.extra  # the job queue's (service.jobs)
    degraded = [a for a in fig.of("ready", "during") if '"redis"' in a.body]
    assert degraded and all(a.status == 200 for a in fig.of("ready")), fig.report()
    ready_again = fig.recovered_s(lambda a: '"status":"ready"' in a.body, kind="ready")
    assert ready_again is not None and ready_again < 5, fig.report()
    print(f"outage figures: Redis stopped: /readyz 'ready' again {ready_again} s after the start")
    assert _log_lines(stack, "Redis unreachable:") - lines == 1, stack.tail()  # once, however many predicts
    assert "Redis unreachable: predict rates are held per process until it is back: over after" in stack.tail()


# -- by hand, under wrk ---------------------------------------------------------------------------

_WRK_LUA = """
local paths = {%(paths)s}
local method, body, n = "%(method)s", nil, 0
counts = {}
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args)
  if method == "POST" then local f = io.open("%(body)s", "rb"); body = f:read("*a"); f:close() end
  wrk.headers["Authorization"] = "Bearer %(key)s"
  wrk.headers["Content-Type"] = "application/octet-stream"
end
function request()
  n = n + 1
  local id = paths[(n %% #paths) + 1]
  if method == "POST" then return wrk.format("POST", "/v1/paths/" .. id .. "/predict", nil, body) end
  return wrk.format("GET", "/v1/paths/" .. id)
end
function response(status, headers, body) counts[status] = (counts[status] or 0) + 1 end
function done(summary, latency, requests)
  local all = {}
  for _, t in ipairs(threads) do
    for s, c in pairs(t:get("counts")) do all[s] = (all[s] or 0) + c end
  end
  local parts = {}
  for s, c in pairs(all) do table.insert(parts, '"' .. s .. '": ' .. c) end
  local e = summary.errors
  table.insert(parts, '"socket errors": ' .. (e.connect + e.read + e.write + e.timeout))
  io.write("wrk-counts {" .. table.concat(parts, ", ") .. "}\\n")
end
"""


def _wrk(stack: Stack, seconds: float, work: Path) -> dict[str, dict]:
    """wrk for ``seconds``: 14 connections of warm predicts and 2 of GET /v1/paths/{id} (needs the
    database), at once, on loopback; the status counts of each."""
    body = work / "body.npy"
    body.write_bytes(stack.body)
    procs = {}
    for kind, method, conns in (("predict", "POST", 14), ("db", "GET", 2)):
        lua = work / f"{kind}.lua"
        lua.write_text(
            _WRK_LUA
            % {"paths": ", ".join(f'"{i}"' for i in stack.ids), "method": method, "body": body, "key": stack.key["key"]}
        )
        cmd = [
            "wrk",
            "-t1",
            f"-c{conns}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "10s",
            "-s",
            str(lua),
            stack.url,
        ]
        procs[kind] = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = {}
    for kind, p in procs.items():
        text, _ = p.communicate(timeout=seconds + 60)
        line = next(x for x in text.splitlines() if x.startswith("wrk-counts "))
        out[kind] = json.loads(line.removeprefix("wrk-counts "))
    return out


def wrk_scenarios(phase_s: float = 4.0) -> list[dict]:
    """The three outages of the tests above, each phase (before, during, after) one wrk run; a
    restart happens 1 s into its "during" run."""
    root = Path(tempfile.mkdtemp(prefix="zoo-outages-wrk-"))
    stack = Stack(root)
    results = []
    try:
        scenarios = (
            ("PostgreSQL restarted", stack.pg.restart, None, 0.0),
            ("PostgreSQL stopped for 12 s", stack.pg.stop, stack.pg.start, 12.0),
            ("Redis stopped for 6 s", stack.redis.stop, stack.redis.start, 6.0),
        )
        for name, fault, heal, hold_s in scenarios:
            before = _wrk(stack, phase_s, root)
            if heal is None:
                done: dict = {}
                t = threading.Thread(target=lambda done=done: done.update(_wrk(stack, phase_s, root)))
                t.start()
                time.sleep(1)
                fault()
                t.join()
                during = done
            else:
                fault()
                during = _wrk(stack, hold_s, root)
                heal()
            after = _wrk(stack, phase_s, root)
            phases = {"before": before, "during": during, "after": after}
            errors = sum(c.get("500", 0) for p in phases.values() for c in p.values())
            results.append({"scenario": name, "500": errors, **phases})
            print(json.dumps(results[-1]), flush=True)
        assert "Traceback" not in stack.log.read_text(errors="replace"), stack.tail()
    finally:
        stack.close()
        shutil.rmtree(root, ignore_errors=True)
    return results


if __name__ == "__main__":  # python -m tests.system.test_outages_serving
    wrk_scenarios()
