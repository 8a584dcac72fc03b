"""`zoo serve`: the supervisor. It starts one inference process (the device's owner) and
``ZOO_HTTP_WORKERS`` HTTP worker processes in front of it on one port, restarts the inference
process when it dies, and stops everything when it is stopped; its children die with it even
when it is killed (SIGKILL). ``ZOO_HTTP_WORKERS=0`` serves everything from one process."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from service.common.procs import SUPERVISOR_ENV

log = logging.getLogger("zoo.supervisor")


class InferenceProcess:
    """``python -m service.serve.infer``, restarted whenever it exits while the supervisor runs."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._watch = threading.Thread(target=self._run, name="zoo-inference-watch", daemon=True)

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "service.serve.infer"], env=self.env)
        self._watch.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            assert self.proc is not None
            code = self.proc.wait()
            if self._stopping.is_set():
                return
            self.restarts += 1
            _forget_metrics_of(self.proc.pid)
            log.warning("the inference process exited (code %s); starting it again (restart %d)", code, self.restarts)
            if self._stopping.wait(0.5):
                return
            self.proc = subprocess.Popen([sys.executable, "-m", "service.serve.infer"], env=self.env)

    def stop(self, timeout: float = 15) -> None:
        self._stopping.set()
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _forget_metrics_of(pid: int) -> None:
    """A dead process's live gauges leave the sums (its counters stay, as Prometheus expects)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def serve(host: str, port: int, access_log: bool) -> None:
    import uvicorn

    from zoo_store.core.settings import Settings

    settings = Settings()
    if settings.http_workers == 0:
        from service.api.app import create_app

        uvicorn.run(create_app(settings), host=host, port=port, log_level="info", access_log=access_log)
        return
    ipc = Path(tempfile.mkdtemp(prefix="zoo-serve-"))
    (ipc / "metrics").mkdir()
    env = {**os.environ, "ZOO_IPC_DIR": str(ipc), "PROMETHEUS_MULTIPROC_DIR": str(ipc / "metrics"),
           SUPERVISOR_ENV: str(os.getpid())}  # fmt: skip
    os.environ.update(env)  # the workers uvicorn starts inherit it; so does this process's own front (1 worker)
    inference = InferenceProcess(env)
    inference.start()
    log.warning("zoo serve: inference process %s, %d HTTP worker(s) on %s:%d", inference.proc.pid,
                settings.http_workers, host, port)  # fmt: skip
    try:
        from service.serve.front import run_workers

        run_workers(host, port, settings.http_workers, access_log)
    finally:
        inference.stop()
        shutil.rmtree(ipc, ignore_errors=True)
