"""Request body limits as a pure ASGI middleware: Content-Length checked up front, and bodies
sent without one (chunked) cut off at the same limit. Either way the answer is a 413 problem."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import is_oip
from zoo_store.core.settings import Settings


class BodyLimit:
    def __init__(self, app: ASGIApp, settings: Settings):
        self.app, self.settings = app, settings

    def limit_for(self, path: str) -> int:
        if path == "/v1/zoo/models":
            return self.settings.max_base_bytes
        return self.settings.max_upload_bytes if path == "/v1/datasets" else self.settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope["path"])
        size = dict(scope["headers"]).get(b"content-length")
        if size is not None and (not size.isdigit() or int(size) > limit):
            return await _too_large(
                send, f"request body is {size.decode(errors='replace')} bytes; the limit is {limit}", scope["path"]
            )
        seen, exceeded, started = 0, False, False

        async def limited_receive() -> Message:
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    exceeded = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # the app's own answer to the cut-off body is replaced by the 413 below
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await _too_large(send, f"request body exceeds the limit of {limit} bytes", scope["path"])


async def _too_large(send: Send, detail: str, path: str) -> None:
    if is_oip(path):
        body, ctype = json.dumps({"error": detail}).encode(), b"application/json"
    else:
        problem = {"type": "about:blank", "title": "Payload too large", "status": 413, "detail": detail}
        body, ctype = json.dumps(problem).encode(), b"application/problem+json"
    headers = [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
