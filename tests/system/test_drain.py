"""`zoo serve` stopped with SIGTERM drains: it stops taking connections, answers the requests it
holds, and a request that arrives on an open keep-alive connection while it drains is answered
(with ``Connection: close``) rather than the connection being closed under it; the HTTP workers
drain before the inference process stops (a request passed through to it is still answered)."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest

from bench.scale import Server
from tests.system.test_serve import _npy, zoo_dir  # noqa: F401  (a fixture)

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")


def _request(sock: socket.socket, method: str, path: str, key: str, body: bytes = b"") -> bytes:
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: zoo\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)


def _one_answer(sock: socket.socket, timeout: float = 10) -> tuple[int, dict[str, str]]:
    """One response off a keep-alive connection (its body read by its Content-Length)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection was closed, unanswered: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_drains_keep_alive_connections(zoo_dir, workers: int) -> None:  # noqa: F811
    data_dir, ids = zoo_dir
    serve = Server(data_dir, workers=workers, ZOO_DRAIN_IDLE_S="2")
    try:
        conns = [socket.create_connection(("127.0.0.1", serve.port)) for _ in range(4)]
        for sock in conns:  # each used once: open, idle, kept alive
            _request(sock, "POST", f"/v1/paths/{ids[0]}/predict", serve.key, _npy())
            status, headers = _one_answer(sock)
            assert status == 200 and headers.get("connection") != "close"
        t = time.monotonic()
        serve.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # draining now: no new connection is taken ...
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", serve.port), timeout=1).recv(1)
        # ... but a request on an open connection is answered, and told the connection closes
        _request(conns[0], "POST", f"/v1/paths/{ids[0]}/predict", serve.key, _npy())
        _request(conns[1], "GET", "/v1/zoo/models", serve.key)  # passed through: the inference process is up
        _request(conns[2], "GET", "/healthz", serve.key)
        for sock in conns[:3]:
            status, headers = _one_answer(sock)
            assert status == 200 and headers["connection"] == "close", headers
        conns[3].settimeout(5)
        assert conns[3].recv(1) == b""  # an idle one is closed (after ZOO_DRAIN_IDLE_S)
        code = serve.proc.wait(30)
        took = time.monotonic() - t
        assert took < 10, f"zoo serve took {took:.1f} s to drain and exit"
        assert code in (0, -signal.SIGTERM), code
    finally:
        serve.client.close()
        if serve.proc.poll() is None:
            serve.proc.kill()
