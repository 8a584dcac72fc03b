"""uvicorn's httptools protocol with the bounds an edge needs, for `zoo serve`'s HTTP workers (and
its one-process mode): request headers (the request line too) above ``max_header_bytes`` get 431;
a request whose headers do not all arrive within ``read_timeout_s`` of its first byte, or whose body
stops arriving for ``read_timeout_s`` while the app waits for it, gets 408; either way the
connection is closed. A connection that sends no request at all is closed after ``read_timeout_s``.

And a drain: when the server shuts down (SIGTERM), a connection that is idle between requests is
kept open ``drain_idle_s`` more, and a request that arrives on it then is answered (with
``Connection: close``) instead of the connection being closed under it; uvicorn's own shutdown
closes such a connection at once. Imports no torch (the HTTP workers import this)."""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from zoo_store.core.settings import Settings

REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class _Refused(Exception):
    """Raised inside the parser's callbacks to stop parsing a request that is refused."""


class EdgeProtocol(HttpToolsProtocol):
    max_header_bytes = 64 * 1024
    read_timeout_s = 30.0
    drain_idle_s = 1.0

    @classmethod
    def configure(cls, settings: Settings) -> None:
        """This process's bounds (each worker process calls it: the class travels by name)."""
        cls.max_header_bytes, cls.read_timeout_s = settings.max_header_bytes, settings.read_timeout_s
        cls.drain_idle_s = settings.drain_idle_s

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._reading: str | None = None  # "head" or "body" while a request arrives, else None
        self._timer: asyncio.TimerHandle | None = None
        self._refusal: tuple[int, str] | None = None
        self._draining = False

    # -- the read timeout ---------------------------------------------------------------------

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(self.read_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._reading is None:  # no request started: an idle connection
            if self.cycle is None or self.cycle.response_complete:
                self.transport.close()
            return
        if self._reading == "body" and self.flow.read_paused and not self.cycle.response_complete:
            self._arm()  # the app is not reading (yet): the client is not the one who is slow
            return
        what = "headers" if self._reading == "head" else "body"
        self._refuse(408, f"the request's {what} did not arrive within {self.read_timeout_s:g} s")

    def _refuse(self, status: int, detail: str) -> None:
        """Answer ``status`` (a problem) unless an answer has started, and close the connection."""
        self._disarm()
        if self._reading == "body" and self.cycle is not None:  # this request's cycle: the app may be running
            if self.cycle.response_started:
                self.transport.close()
                return
            self.cycle.disconnected = True  # to the app: the client went away (its answer goes nowhere)
        problem = {"type": "about:blank", "title": REASONS[status].decode(), "status": status, "detail": detail}
        body = json.dumps(problem).encode()
        head = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS[status])]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head += [
            b"content-type: application/problem+json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        if self._refusal is not None:  # the parser stopped because a callback refused the request
            self._refuse(*self._refusal)
        else:
            super().send_400_response(msg)

    # -- the parser's callbacks ---------------------------------------------------------------

    def _count(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > self.max_header_bytes and self._refusal is None:
            self._refusal = (431, f"the request's headers exceed {self.max_header_bytes} bytes")
            raise _Refused

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes, self._reading = 0, "head"
        self._arm()  # the whole head within read_timeout_s of its first byte

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._reading = "body"
        self._arm()
        if self._draining and self.cycle is not None:
            self.cycle.keep_alive = False  # answered, with Connection: close

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self._arm()  # the body may take long, but may not stop for read_timeout_s

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading = None
        self._disarm()

    # -- the drain ----------------------------------------------------------------------------

    def shutdown(self) -> None:
        self._draining = True
        if self.cycle is None or self.cycle.response_complete:
            if self._reading is None:
                self.loop.call_later(self.drain_idle_s, self._close_if_idle)
        else:
            self.cycle.keep_alive = False

    def _close_if_idle(self) -> None:
        idle = self._reading is None and (self.cycle is None or self.cycle.response_complete)
        if idle and not self.transport.is_closing():
            self.transport.close()
