"""`zoo serve` as users run it: HTTP worker processes in front of one inference process. Metrics
from every process reach /metrics; a killed inference process means 503s, then a restart;
stopping or killing `zoo serve` leaves no process behind."""

from __future__ import annotations

import io
import os
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench.common import dir_store
from bench.scale import Server, make_paths
from service.common.procs import descendants
from tests.conftest import tiny_card, tiny_weights
from zoo_store.core.bundle import decode_bundle

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")


def _gone(pids, timeout: float = 15) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not any(Path(f"/proc/{p}").exists() and "Z" not in _state(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def _npy(n: int = 1) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(0).integers(0, 256, (n, 1, 28, 28), dtype=np.uint8))
    return buf.getvalue()


class Serve(Server):
    """The bench's `zoo serve` child process, with what these tests ask of it."""

    def predict(self, path_id: str) -> httpx.Response:
        return self.client.post(
            f"/v1/paths/{path_id}/predict?top_k=2", content=_npy(), headers={"content-type": "application/octet-stream"}
        )

    def inference_pid(self) -> int:
        return next(p for p, cmd in descendants(self.proc.pid).items() if "service.serve.infer" in cmd)


@pytest.fixture
def zoo_dir(tmp_path: Path) -> tuple[Path, list[str]]:
    store = dir_store(tmp_path)
    store.add_base(tiny_card("res"), tiny_weights("resnet_s", 10))
    ids = []
    for b in make_paths(store, "res", 3):
        bundle = decode_bundle(b)
        store.save_path(bundle)
        ids.append(bundle.id)
    return tmp_path, ids


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_restart_and_clean_stop(zoo_dir, workers: int) -> None:
    data_dir, ids = zoo_dir
    serve = Serve(data_dir, workers=workers)
    try:
        tree = descendants(serve.proc.pid)
        assert sum("service.serve.infer" in c for c in tree.values()) == 1
        assert len(tree) >= (1 if workers == 1 else 1 + workers)  # the inference process (+ the workers)
        for pid in ids:
            r = serve.predict(pid)
            assert r.status_code == 200, r.text
            assert len(r.json()["predictions"][0]["top_k"]) == 2
        metrics = serve.client.get("/metrics").text  # the workers' request counts and the inference loop's batches
        assert 'route="/v1/paths/{path_id}/predict"' in metrics
        batches = [ln for ln in metrics.splitlines() if ln.startswith("zoo_batch_size_count")]
        assert batches and float(batches[0].split()[-1]) >= len(ids)

        os.kill(serve.inference_pid(), signal.SIGKILL)
        t = time.monotonic()
        r = serve.predict(ids[0])
        assert r.status_code == 503 and time.monotonic() - t < 5, r.text
        assert serve.wait_ready(120), "the supervisor did not restart the inference process"
        assert serve.predict(ids[0]).status_code == 200
        tree = descendants(serve.proc.pid)
    finally:
        serve.proc.send_signal(signal.SIGTERM)
        serve.proc.wait(30)
        serve.client.close()
    assert _gone(tree), f"left behind: {[c for p, c in tree.items() if _state(p) != 'Z']}"


def test_killing_zoo_serve_leaves_nothing_behind(zoo_dir) -> None:
    data_dir, ids = zoo_dir
    serve = Serve(data_dir, workers=2)
    try:
        assert serve.predict(ids[0]).status_code == 200
        tree = descendants(serve.proc.pid)
        assert len(tree) >= 3
        serve.proc.kill()  # SIGKILL: no chance to clean up; the children die with it
        serve.proc.wait(10)
    finally:
        serve.client.close()
    assert _gone(tree), f"left behind: {[c for p, c in tree.items() if _state(p) != 'Z']}"


@pytest.mark.parametrize("supervisor_alive", [True, False])
def test_a_child_orphaned_while_starting_still_dies_with_the_supervisor(supervisor_alive: bool) -> None:
    """A worker that was still importing when `zoo serve` was killed is an orphan by the time it
    arms its death signal: it must exit then, not serve on. A child of a live supervisor stays, and
    its own children do not inherit the supervisor's pid."""
    import subprocess
    import sys

    from service.common.procs import SUPERVISOR_ENV

    if supervisor_alive:
        supervisor = os.getpid()  # this test is the child's parent
    else:
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        supervisor = gone.pid
    code = (
        "import os, time; from service.common.procs import die_with_supervisor, SUPERVISOR_ENV; die_with_supervisor(); "
        "time.sleep(1); print(SUPERVISOR_ENV in os.environ)"
    )
    child = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        env={**os.environ, SUPERVISOR_ENV: str(supervisor)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == (0 if supervisor_alive else -signal.SIGTERM), child.stderr
    assert child.stdout.strip() == ("False" if supervisor_alive else "")
