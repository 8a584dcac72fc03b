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
import time
from collections.abc import Callable
from pathlib import Path

from service.common.procs import SUPERVISOR_ENV

log = logging.getLogger("zoo.supervisor")


class InferenceProcess:
    """``python -m service.serve.infer``, restarted whenever it exits while the supervisor runs:
    after a pause that doubles (``FIRST_PAUSE_S`` up to ``MAX_PAUSE_S``) while it keeps exiting, and
    starts again from ``FIRST_PAUSE_S`` after it stayed up ``STEADY_S``. ``MAX_FAILED_STARTS`` starts
    in a row that never served (its app's socket never came up): it gives up, ``cause`` says why (the last line the
    process wrote on stderr) and ``gave_up``
    (called from the watching thread) is told."""

    FIRST_PAUSE_S, MAX_PAUSE_S, STEADY_S, MAX_FAILED_STARTS = 0.5, 30.0, 60.0, 5

    def __init__(self, env: dict[str, str], ipc: Path, gave_up: Callable[[], None] = lambda: None):
        self.env, self.app_sock, self.gave_up = env, ipc / "app.sock", gave_up
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.cause: str | None = None  # set when it gave up
        self.last_line = ""  # the last line the current process wrote on stderr
        self._stopping = threading.Event()
        self._watch = threading.Thread(target=self._run, name="zoo-inference-watch", daemon=True)

    def _spawn(self) -> None:
        self.app_sock.unlink(missing_ok=True)  # it serves once its app binds this again
        self.last_line = ""
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.serve.infer"], env=self.env, stderr=subprocess.PIPE
        )
        threading.Thread(target=self._tee, args=(self.proc.stderr,), name="zoo-inference-stderr", daemon=True).start()

    def _tee(self, stream) -> None:
        """The process's stderr to ours, line by line, remembering the last line."""
        for raw in iter(stream.readline, b""):
            sys.stderr.buffer.write(raw)
            sys.stderr.flush()
            if raw.strip():
                self.last_line = raw.decode(errors="replace").strip()
        stream.close()

    def start(self) -> None:
        self._spawn()
        self._watch.start()

    def _served(self) -> bool:
        return self.app_sock.exists()

    def _run(self) -> None:
        failed, pause = 0, self.FIRST_PAUSE_S
        while not self._stopping.is_set():
            assert self.proc is not None
            served = False
            while True:  # its exit, noticing meanwhile whether it came up
                try:
                    code = self.proc.wait(0.2)
                    break
                except subprocess.TimeoutExpired:
                    served = served or self._served()
            if self._stopping.is_set():
                return
            served = served or self._served()
            self.restarts += 1
            _forget_metrics_of(self.proc.pid)
            failed = 0 if served else failed + 1
            if failed >= self.MAX_FAILED_STARTS:
                self.cause = (
                    f"the inference process failed to start {failed} times in a row (exit code {code}): "
                    f"{self.last_line or 'it wrote nothing on stderr'}"
                )
                log.error("%s; giving up", self.cause)
                self.gave_up()
                return
            if time.monotonic() - self.started_at >= self.STEADY_S:
                pause = self.FIRST_PAUSE_S  # it stayed up a while: not a crash loop
            wait, pause = pause, min(pause * 2, self.MAX_PAUSE_S)
            log.warning(
                "the inference process exited (code %s); starting it again in %.1f s (restart %d)",
                code,
                wait,
                self.restarts,
            )
            if self._stopping.wait(wait):
                return
            self._spawn()

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

    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else f"[{host}]" if ":" in host else host
    os.environ.setdefault("ZOO_PUBLIC_URL", f"http://{shown}:{port}")  # the sign-in link's (inherited)
    settings = Settings()
    if settings.http_workers == 0:
        from service.api.app import create_app
        from service.serve.edge_http import EdgeProtocol

        EdgeProtocol.configure(settings)
        uvicorn.run(
            create_app(settings),
            host=host,
            port=port,
            log_level="info",
            access_log=access_log,
            http=EdgeProtocol,
            timeout_graceful_shutdown=settings.drain_s,
        )
        return
    ipc = Path(tempfile.mkdtemp(prefix="zoo-serve-"))
    (ipc / "metrics").mkdir()
    env = {
        **os.environ,
        "ZOO_IPC_DIR": str(ipc),
        "PROMETHEUS_MULTIPROC_DIR": str(ipc / "metrics"),
        SUPERVISOR_ENV: str(os.getpid()),
    }
    os.environ.update(env)  # the workers uvicorn starts inherit it; so does this process's own front (1 worker)
    giving_up = threading.Event()  # set: the HTTP workers stop (as on SIGTERM), then this process exits 1
    inference = InferenceProcess(env, ipc, gave_up=giving_up.set)
    inference.start()
    log.warning(
        "zoo serve: inference process %s, %d HTTP worker(s) on %s:%d",
        inference.proc.pid,
        settings.http_workers,
        host,
        port,
    )
    try:
        from service.serve.front import run_workers

        run_workers(
            host, port, settings.http_workers, access_log, stop=giving_up
        )  # SIGTERM: the workers drain, then return
    finally:
        inference.stop()  # then the inference process (the workers' requests in flight needed it)
        shutil.rmtree(ipc, ignore_errors=True)
    if inference.cause:
        raise SystemExit(f"zoo serve: {inference.cause}")
