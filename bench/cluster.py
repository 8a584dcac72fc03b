"""Distributed mode as processes on this machine: API replicas (`zoo serve`) and composition
workers (`zoo worker`) on one PostgreSQL and one Redis, each with its own empty ``ZOO_DATA_DIR``,
behind nginx with ``deploy/nginx.conf``. ``scenario`` is the kill test (tests/docker/test_compose.py runs
it under Docker in CI); ``cluster_suite`` (``zoo bench --suite cluster``) runs it too and measures throughput
through nginx with two replicas against one, for docs/deploy.md."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.common import Say, scratch_database
from bench.scale import free_port, make_paths, one_image, run_load, schedule
from service.client import ZooClient
from zoo_store.archs import build_arch
from zoo_store.core.cards import InputSpec
from zoo_store.store.blobs import DbBlobStore
from zoo_store.store.db import Database
from zoo_store.store.store import TERMINAL, Store

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
GRAY = InputSpec(channels=1, size=28, mean=(0.5,), std=(0.5,))
BASE_ID = "cluster-resnet"
SMALL = {"dataset": "digits", "labels": ["0", "1", "2"], "samples_per_label": 8}
LONG = ({"dataset": "digits"}, 10)  # a job to kill in the middle: ten epochs of 1,257 images (about 1 s each)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    url: str = ""  # replicas and nginx: where they answer

    def alive(self) -> bool:
        return self.popen.poll() is None

    def send(self, sig: int) -> None:
        """To the process and everything it started (its session), even when the leader is gone."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    def kill(self) -> None:
        """SIGKILL: a machine lost, not a clean stop."""
        self.send(signal.SIGKILL)
        self.popen.wait(30)

    def stop(self) -> None:
        self.send(signal.SIGTERM)
        try:
            self.popen.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@dataclass
class Cluster:
    """Processes of one distributed deployment; ``root`` holds their data dirs, logs and nginx's files."""

    root: Path
    database_url: str
    redis_url: str
    procs: dict[str, Proc] = field(default_factory=dict)
    stream: str = field(default_factory=lambda: f"zoo:cluster:{uuid.uuid4().hex[:8]}")
    generation: int = 0  # bumped by ``restart``: every process starts again with a new empty data dir

    def env(self, name: str) -> dict[str, str]:
        data = self.root / f"gen{self.generation}" / name
        data.mkdir(parents=True, exist_ok=True)
        return {
            **os.environ,
            "ZOO_MODE": "distributed",
            "ZOO_DATABASE_URL": self.database_url,
            "ZOO_REDIS_URL": self.redis_url,
            "ZOO_DATA_DIR": str(data),
            "ZOO_DEMO_ZOO": "false",
            "ZOO_JOBS_STREAM": self.stream,
            "ZOO_JOB_CLAIM_IDLE_S": "3",
            "ZOO_ZOO_POLL_S": "0.5",
            "ZOO_HTTP_WORKERS": "1",
            "ZOO_DEVICE": "cpu",
            "PYTHONUNBUFFERED": "1",
        }

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str], url: str = "") -> Proc:
        log = self.root / f"{name}.gen{self.generation}.log"
        with log.open("wb") as f:  # a file, not a pipe nobody drains
            popen = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = Proc(name, popen, log, url)
        return self.procs[name]

    def replica(self, name: str, **env: str) -> Proc:
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
        ]
        return self._spawn(name, cmd, {**self.env(name), **env}, f"http://127.0.0.1:{port}")

    def worker(self, name: str, **env: str) -> Proc:
        """``zoo worker``; ``env``: settings of its own (``ZOO_JOB_STOP_GRACE_S="1"``) over the cluster's."""
        return self._spawn(name, [sys.executable, "-m", "service.cli", "worker"], {**self.env(name), **env})

    def nginx(self, name: str, replicas: list[str]) -> Proc:
        """nginx with deploy/nginx.conf unchanged but for its port, before the replicas ``replicas``."""
        home = self.root / name
        (home / "tmp").mkdir(parents=True, exist_ok=True)
        port = free_port()
        conf = (DEPLOY / "nginx.conf").read_text()
        assert "listen 127.0.0.1:8080;" in conf
        (home / "nginx.conf").write_text(conf.replace("listen 127.0.0.1:8080;", f"listen 127.0.0.1:{port};"))
        lines = [f"server {self.procs[r].url.removeprefix('http://')} max_fails=1 fail_timeout=5s;" for r in replicas]
        (home / "replicas.conf").write_text("\n".join(lines) + "\n")
        cmd = [NGINX, "-p", str(home), "-c", str(home / "nginx.conf"), "-e", "stderr", "-g", "daemon off; user root;"]
        return self._spawn(name, cmd, dict(os.environ), f"http://127.0.0.1:{port}")

    def start(self, replicas: int = 2, workers: int = 2) -> None:
        for i in range(replicas):
            self.replica(f"replica{i}")
        for i in range(workers):
            self.worker(f"worker{i}")
        self.nginx("nginx", [f"replica{i}" for i in range(replicas)])
        self.wait_ready()

    def wait_ready(self, timeout: float = 180) -> None:
        """Every replica answers /readyz 200 and every worker says it consumes; raises naming the laggard."""
        end = time.monotonic() + timeout
        for p in self.procs.values():
            while not self._ready(p):
                if not p.alive():
                    raise RuntimeError(f"{p.name} exited: {p.tail()}")
                if time.monotonic() > end:
                    raise TimeoutError(f"{p.name} not ready after {timeout} s: {p.tail()}")
                time.sleep(0.1)

    @staticmethod
    def _ready(p: Proc) -> bool:
        if p.name.startswith("worker"):
            return "consuming jobs" in p.log.read_text(errors="replace")
        try:
            path = "/readyz" if p.name.startswith("replica") else "/healthz"
            return httpx.get(p.url + path, timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def restart(self) -> None:
        """Stop every process and start the same set again, each with a new empty data dir."""
        names = [n for n in self.procs if not n.startswith("nginx")]
        for p in self.procs.values():
            p.stop()
        self.procs.clear()
        self.generation += 1
        for name in names:
            (self.replica if name.startswith("replica") else self.worker)(name)
        self.nginx("nginx", [n for n in names if n.startswith("replica")])
        self.wait_ready()

    @property
    def admin_key(self) -> str:
        """The admin key the first replica to start wrote into its data dir (no other writes one)."""
        found = sorted(self.root.glob("gen*/replica*/admin.key"))
        if not found:
            raise LookupError("no replica wrote an admin key (keys were in the database already?)")
        return found[0].read_text().strip()

    def client(self, name: str) -> ZooClient:
        return ZooClient(self.procs[name].url, api_key=self.admin_key)

    def holder_of(self, job_id: str) -> Proc:
        """The worker whose claim on the job's stream entry is pending (its consumer name ends in its pid)."""
        import redis

        r = redis.Redis.from_url(self.redis_url, decode_responses=True)
        try:
            for entry in r.xpending_range(self.stream, "workers", min="-", max="+", count=100):
                fields = r.xrange(self.stream, entry["message_id"], entry["message_id"])
                if fields and fields[0][1]["job"] == job_id:
                    pid = int(entry["consumer"].rsplit("-", 2)[1])  # host-pid-random
                    return next(p for p in self.procs.values() if p.popen.pid == pid)
        finally:
            r.close()
        raise LookupError(f"no worker holds job {job_id}")

    def close(self) -> None:
        for p in self.procs.values():
            p.stop()
        import redis

        r = redis.Redis.from_url(self.redis_url)
        r.delete(self.stream, f"{self.stream}:epoch")
        r.close()


# -- the scenario ---------------------------------------------------------------------------------


def tiny_base(seed: int = 0) -> tuple[dict, bytes]:
    """A small resnet on 28 x 28 grey digits with seeded random weights: its card and safetensors."""
    import torch
    from safetensors.torch import save

    torch.manual_seed(seed)
    net = build_arch("resnet_s", {"num_classes": 10})
    card = {"id": BASE_ID, "arch": "resnet_s", "labels": list("0123456789"), "input": GRAY.model_dump(mode="json")}
    return card, save({k: v.contiguous() for k, v in net.state_dict().items()})


def wait_job(client: ZooClient, job_id: str, until: tuple[str, ...] = TERMINAL, timeout: float = 300) -> dict:
    """The job once its state is one of ``until`` or terminal."""
    end = time.monotonic() + timeout
    while (job := client.job(job_id))["state"] not in (*until, *TERMINAL):
        if time.monotonic() > end:
            raise TimeoutError(f"job {job_id} still {job['state']} after {timeout} s")
        time.sleep(0.1)
    return job


def compose(client: ZooClient, task: dict = SMALL, epochs: int = 1) -> str:
    return client.compose(
        {"method": "reprogram", "base": BASE_ID, "task": task, "train": {"epochs": epochs, "seed": 0}}
    )["id"]


def predict(client: ZooClient, path_id: str, body: bytes) -> dict:
    r = client.http.post(
        f"/v1/paths/{path_id}/predict", content=body, headers={"content-type": "application/octet-stream"}
    )
    r.raise_for_status()
    return r.json()


def predicts_served(url: str) -> int:
    """The replica's count of predicts answered 200 (its /metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        if family.name == "zoo_http_requests":
            return int(
                sum(
                    s.value
                    for s in family.samples
                    if s.name.endswith("_total")
                    and s.labels["status"] == "200"
                    and s.labels["route"] == "/v1/paths/{path_id}/predict"
                )
            )
    return 0


def count_rows(database_url: str) -> dict[str, int]:
    from sqlalchemy import create_engine, text

    eng = create_engine(database_url)
    try:
        with eng.connect() as c:
            return {t: c.scalar(text(f"SELECT count(*) FROM {t}")) for t in ("bases", "jobs", "paths")}
    finally:
        eng.dispose()


def load(proc: Proc, key: str, ids: list[str], body: bytes, requests: int, seed: int = 0) -> dict:
    """A bounded closed-loop predict load on ``proc`` over 16 connections, uniform over ``ids``."""
    return run_load(proc.url, ids, schedule(len(ids), requests, "uniform", seed), body, 16, key)


def scenario(cluster: Cluster, say: Say = print, during: int = 1500) -> dict:
    """Point 5 of issue 13 on a started cluster (2 replicas, 2 workers, nginx): processes here, or
    containers (``bench.compose.Compose``: the same names, ``procs``, ``client``, ``holder_of``,
    ``restart``, ``admin_key``, ``database_url``). Raises at the first step that does not hold;
    returns the counts it measured. ``during``: the predicts sent while a replica is killed (enough
    to outlast the kill: ``docker kill`` takes longer than a signal)."""
    a, b, proxy = (cluster.client(n) for n in ("replica0", "replica1", "nginx"))
    _, body = one_image(GRAY)
    report: dict = {}

    say("cluster: register a base through replica0; replica1 follows; compose through replica1")
    card, weights = tiny_base()
    _, created = a.add_model(card, weights)
    assert created
    end = time.monotonic() + 30
    while b.http.get("/readyz").json()["zoo_version"] != 1:  # loaded by the follower, not on demand
        assert time.monotonic() < end, "replica1 did not load the base registered through replica0"
        time.sleep(0.1)
    first_job = compose(b)
    job = wait_job(b, first_job)
    assert job["state"] == "succeeded", job
    first = job["path_id"]
    answers = [predict(u, first, body) for u in (a, b, proxy)]
    assert answers[0] == answers[1] == answers[2], answers

    say("cluster: SIGKILL the worker running a job")
    job_id = compose(proxy, *LONG)
    while (job := wait_job(proxy, job_id, until=("running",)))["progress"].get("epoch", 0) < 1:  # into its epochs
        assert job["state"] == "running", f"the long job ended before it could be killed: {job}"
        time.sleep(0.1)
    victim = cluster.holder_of(job_id)
    killed_at = time.monotonic()
    victim.kill()
    job = wait_job(proxy, job_id, timeout=600)
    report["worker_takeover_s"] = round(time.monotonic() - killed_at, 1)
    assert job["state"] == "succeeded", job
    assert not victim.alive(), f"{victim.name} was killed, yet runs again: the job may not have moved"
    rows = count_rows(cluster.database_url)
    assert rows == {"bases": 1, "jobs": 2, "paths": 2}, rows
    report["rows_after_worker_kill"] = rows
    second = job["path_id"]

    say("cluster: through nginx, each path's predicts go to one replica")
    ids, owner = [first, second], {}
    for pid in ids:
        before = {n: predicts_served(cluster.procs[n].url) for n in ("replica0", "replica1")}
        for _ in range(10):
            predict(proxy, pid, body)
        served = {n: predicts_served(cluster.procs[n].url) - k for n, k in before.items()}
        assert sorted(served.values()) == [0, 10], f"path {pid}: 10 predicts through nginx were served {served}"
        owner[pid] = max(served, key=served.__getitem__)
    baseline = {pid: predict(proxy, pid, body) for pid in ids}

    victim = cluster.procs[owner[first]]
    say(f"cluster: SIGKILL {victim.name} (it serves path {first}) under a predict load through nginx")
    with ThreadPoolExecutor(1) as pool:
        served = predicts_served(victim.url)  # /metrics: no key needed
        loading = pool.submit(load, cluster.procs["nginx"], cluster.admin_key, ids, body, during)
        while predicts_served(victim.url) < served + 100:  # well into the load
            assert not loading.done(), f"the load ended before the kill: {loading.result()}"
            time.sleep(0.05)
        victim.kill()
        assert not loading.done(), "the load ended before the kill"
        during = loading.result()
    report["load_during_kill"] = {k: during[k] for k in ("sent", "errors", "first_error")}
    after = load(cluster.procs["nginx"], cluster.admin_key, ids, body, requests=300, seed=1)
    assert after["errors"] == 0, after
    report["load_after_kill"] = {k: after[k] for k in ("sent", "errors")}

    say("cluster: restart every process, each with a new empty data dir")
    cluster.restart()
    rows = count_rows(cluster.database_url)
    assert rows == {"bases": 1, "jobs": 2, "paths": 2}, rows
    clients = [cluster.client(n) for n in ("replica0", "replica1", "nginx")]
    for c in clients:
        for pid in ids:
            assert predict(c, pid, body) == baseline[pid], (
                f"{c.http.base_url} predicts {pid} differently after the restart"
            )
    states = {j["id"]: j["state"] for j in clients[2].jobs()}
    assert states == {first_job: "succeeded", job_id: "succeeded"}, states
    return report


# -- the suite ------------------------------------------------------------------------------------


def throughput(
    say: Say, root: Path, database_url: str, redis_url: str, paths: int, requests: int, rounds: int
) -> list[dict]:
    """Predicts/s through nginx before both replicas, before one, and at that one directly (same
    processes, same paths), alternated ``rounds`` times; the base of ``scenario`` must be registered."""
    cluster = Cluster(root, database_url, redis_url)
    try:
        for name in ("replica0", "replica1"):
            cluster.replica(name)
        cluster.nginx("nginx", ["replica0", "replica1"])
        cluster.nginx("nginx-one", ["replica0"])
        cluster.wait_ready()
        db = Database(database_url)
        bundles = make_paths(Store(db, DbBlobStore(db)), BASE_ID, paths)
        db.dispose()
        ids = [cluster.client("nginx").import_bundle(b)[0]["id"] for b in bundles]
        _, body = one_image(GRAY)
        runs = []
        setups = (
            ("nginx", "2, through nginx"),
            ("nginx-one", "1, through nginx"),
            ("replica0", "1, direct (no nginx)"),
        )
        for name, _ in setups:  # warm: every path materialized where nginx sends it
            load(cluster.procs[name], cluster.admin_key, ids, body, requests=4 * paths)
        for i in range(rounds):
            for name, label in setups:
                r = load(cluster.procs[name], cluster.admin_key, ids, body, requests=requests, seed=i)
                if r["errors"]:
                    raise RuntimeError(f"{r['errors']} predicts failed through {name}: {r['first_error']}")
                runs.append({"replicas": label, **{k: r[k] for k in ("per_second", "p50_ms", "p99_ms")}})
                say(f"cluster: {label}: {r['per_second']:.0f} predicts/s")
        return runs
    finally:
        cluster.close()


def cluster_suite(say: Say, quick: bool) -> list[str]:
    import statistics

    admin = os.environ.get("ZOO_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    redis_url = os.environ.get("ZOO_BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")
    root = Path(tempfile.mkdtemp(prefix="zoo-cluster-"))
    with scratch_database(admin) as database_url:
        cluster = Cluster(root / "kill", database_url, redis_url)
        try:
            cluster.start()
            report = scenario(cluster, say)
        finally:
            cluster.close()
        paths, requests, rounds = (16, 600, 1) if quick else (64, 3000, 3)
        runs = throughput(say, root / "load", database_url, redis_url, paths, requests, rounds)
    shutil.rmtree(root, ignore_errors=True)
    during, after = report["load_during_kill"], report["load_after_kill"]
    mean = {
        label: statistics.mean(r["per_second"] for r in runs if r["replicas"] == label)
        for label in {r["replicas"] for r in runs}
    }
    lines = [
        "2 replicas (`zoo serve`, 1 HTTP worker each) and 2 workers (`zoo worker`) behind nginx with",
        "`deploy/nginx.conf`, on one PostgreSQL and one Redis, each process with its own empty data dir.\n",
        "| Kill test | Measured |",
        "|---|---|",
        "| worker SIGKILLed in the middle of a job: finished by the other worker after | "
        f"{report['worker_takeover_s']} s |",
        "| rows afterwards (bases, jobs, paths) | "
        f"{', '.join(str(v) for v in report['rows_after_worker_kill'].values())} |",
        f"| predicts through nginx while a replica was SIGKILLed: failed / sent | {during['errors']} / "
        f"{during['sent']} |",
        f"| predicts through nginx after the kill: failed / sent | {after['errors']} / {after['sent']} |",
        "| every process restarted with a new empty data dir: bases, paths, jobs and predictions | all there, "
        "identical |",
        "",
        f"Throughput through nginx, {paths} reprogram paths of one base (uniform traffic, `.npy` bodies, 16 "
        "connections,",
        f"{requests} predicts a run, {rounds} run(s) each, alternated):\n",
        "| Replicas | predicts/s | p50 ms | p99 ms |",
        "|---|---|---|---|",
        *(f"| {r['replicas']} | {r['per_second']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |" for r in runs),
    ]
    two, one, direct = (mean[k] for k in ("2, through nginx", "1, through nginx", "1, direct (no nginx)"))
    lines.append(
        f"\n**2 replicas / 1 replica: {two / one:.2f}x** (means of the runs); nginx's own cost, "
        f"1 replica through nginx / directly: {one / direct:.2f}x."
    )
    return lines
