"""The compose topology under a real Docker engine: ``docker-compose.yml`` (2 API replicas, 2 workers,
nginx, PostgreSQL, Redis, every container on the host's network) brought up from empty volumes,
then ``bench.cluster.scenario``, the kill test ``zoo bench --suite cluster`` runs as processes:
a worker killed mid-job, a replica killed under a predict load through nginx, and ``down`` then
``up`` keeping every base, path and job. tests/docker/test_compose.py runs it (.ci/docker/run)."""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from service.client import ZooClient

ROOT = Path(__file__).resolve().parents[1]
DATABASE_URL = "postgresql+psycopg://postgres:zoo@127.0.0.1:5433/zoo"  # docker-compose.yml's, from the host
REDIS_URL = "redis://127.0.0.1:6380/0"
# the scenario's names -> compose's services (docker-compose.yml listens on these host ports)
SERVICES = {"replica0": ("api1", 8001), "replica1": ("api2", 8002), "nginx": ("nginx", 8080)}


@dataclass
class Container:
    """One service's container, as ``bench.cluster.Proc`` is one process: a name, a url, kill."""

    compose: Compose
    name: str
    service: str
    url: str = ""
    index: int = 1
    _id: str = ""  # until the next up or down

    @property
    def id(self) -> str:
        if not self._id:
            out = self.compose.run("ps", "-a", "-q", self.service, capture=True).split()  # a killed one too
            if len(out) < self.index:
                raise LookupError(f"no container {self.index} of {self.service}: {out}")
            self._id = sorted(out, key=self.compose.number)[self.index - 1]
        return self._id

    def kill(self) -> None:
        """``docker kill``: SIGKILL to the container (restart policies leave a killed one stopped)."""
        subprocess.run([self.compose.docker, "kill", self.id], check=True, capture_output=True)

    def alive(self) -> bool:
        return self.compose.inspect(self.id, "{{.State.Running}}") == "true"

    def tail(self, lines: int = 60) -> str:
        out = subprocess.run(
            [self.compose.docker, "logs", "--tail", str(lines), self.id], capture_output=True, text=True
        )
        return out.stdout + out.stderr


@dataclass
class Compose:
    """``docker-compose -f docker-compose.yml -f <overrides> -p <project>`` in the repository's root."""

    files: list[Path]
    project: str = "zoo-ci"
    env: dict[str, str] = field(default_factory=dict)  # settings of docker-compose.yml's ${...}
    command: list[str] = field(default_factory=lambda: ["docker-compose"])  # or ["docker", "compose"]
    docker: str = "docker"
    database_url: str = DATABASE_URL
    redis_url: str = REDIS_URL
    procs: dict[str, Container] = field(default_factory=dict)
    _admin_key: str = ""

    def __post_init__(self) -> None:
        for name, (service, port) in SERVICES.items():
            self.procs[name] = Container(self, name, service, f"http://127.0.0.1:{port}")
        for i in (1, 2):
            self.procs[f"worker{i - 1}"] = Container(self, f"worker{i - 1}", "worker", index=i)

    def run(self, *args: str, capture: bool = False, timeout: float = 900) -> str:
        cmd = [*self.command, "-p", self.project, *(a for f in self.files for a in ("-f", str(f))), *args]
        out = subprocess.run(
            cmd, cwd=ROOT, env={**os.environ, **self.env}, capture_output=True, text=True, timeout=timeout
        )
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        return out.stdout if capture else ""

    def inspect(self, container: str, template: str) -> str:
        out = subprocess.run([self.docker, "inspect", "-f", template, container], capture_output=True, text=True)
        return out.stdout.strip()

    def number(self, container: str) -> int:
        return int(self.inspect(container, '{{index .Config.Labels "com.docker.compose.container-number"}}') or 0)

    def up(self) -> None:
        self.run("up", "-d", "--no-build")
        self._forget_ids()
        self.wait_ready()

    def down(self, volumes: bool = False) -> None:
        self.run("down", *(["--volumes"] if volumes else []))
        self._forget_ids()

    def _forget_ids(self) -> None:
        for c in self.procs.values():
            c._id = ""

    def wait_ready(self, timeout: float = 300) -> None:
        """Every replica answers /readyz 200 (through nginx too) and every worker says it consumes."""
        end = time.monotonic() + timeout
        for c in self.procs.values():
            while not self._ready(c):
                if time.monotonic() > end:
                    raise TimeoutError(f"{c.name} ({c.service}) not ready after {timeout} s:\n{c.tail()}")
                time.sleep(0.5)

    @staticmethod
    def _ready(c: Container) -> bool:
        try:
            if c.service == "worker":
                return "consuming jobs" in c.tail()
            return httpx.get(c.url + "/readyz", timeout=2).status_code == 200
        except (httpx.TransportError, LookupError):
            return False

    def restart(self) -> None:
        """``down`` then ``up``: every container made again (empty /data), the volumes kept."""
        self.down()
        self.up()

    @property
    def admin_key(self) -> str:
        """The first admin key, read as docs/deploy.md says: from the replica that wrote it."""
        if not self._admin_key:
            for service in ("api1", "api2"):
                try:
                    self._admin_key = self.run("exec", "-T", service, "cat", "/data/admin.key", capture=True).strip()
                    break
                except RuntimeError:
                    continue
            else:
                raise LookupError("no replica wrote /data/admin.key")
        return self._admin_key

    def listeners(self) -> list[str]:
        """Every TCP address a process of the topology listens on, as ``ss`` on the host sees it (host
        networking: one network namespace), each as ``service address:port``."""
        pids: dict[str, str] = {}
        for cid in self.run("ps", "-q", capture=True).split():
            service = self.inspect(cid, '{{index .Config.Labels "com.docker.compose.service"}}')
            top = subprocess.run([self.docker, "top", cid, "-o", "pid"], capture_output=True, text=True)
            pids |= dict.fromkeys(top.stdout.split()[1:], service)
        ss = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
        return sorted(
            {
                f"{pids[pid]} {line.split()[3]}"
                for line in ss.splitlines()
                for pid in re.findall(r"pid=(\d+)", line)
                if pid in pids
            }
        )

    def client(self, name: str) -> ZooClient:
        return ZooClient(self.procs[name].url, api_key=self.admin_key)

    def holder_of(self, job_id: str) -> Container:
        """The worker whose log says it runs the job now (its last attempt)."""
        holders = [
            c for n, c in self.procs.items() if n.startswith("worker") and f"job {job_id}, attempt" in c.tail(10_000)
        ]
        if len(holders) != 1:
            raise LookupError(f"job {job_id}: {len(holders)} workers say they ran it")
        return holders[0]

    def image_bytes(self, image: str) -> int:
        return int(self.inspect(image, "{{.Size}}"))
