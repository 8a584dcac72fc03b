"""The one place where errors become HTTP responses: application/problem+json (RFC 9457)."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute, iter_route_contexts
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from zoo_store.core.errors import ZooError
from zoo_store.core.outage import Outage

log = logging.getLogger("zoo.errors")
DISK_FULL = Outage("disk full: uploads and imports answered 507", log)


def problem(status: int, title: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    return JSONResponse(body, status_code=status, media_type="application/problem+json", headers=headers)


def _loc(err: dict) -> str:
    return ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"


def is_oip(path: str) -> bool:
    """The Open Inference Protocol surface, whose errors are ``{"error": ...}`` bodies."""
    return path == "/v2" or path.startswith("/v2/")


def answer(
    request: Request, status: int, title: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    if is_oip(request.url.path):
        return JSONResponse({"error": detail}, status_code=status, headers=headers)
    return problem(status, title, detail, headers)


def api_routes(app: FastAPI) -> list[Any]:
    """Every API route with its effective path (routers included with a prefix included)."""
    return [ctx for ctx in iter_route_contexts(app.routes) if isinstance(ctx.original_route, APIRoute)]


def _allowed(request: Request) -> str:
    """Every method some route takes at this path (Starlette's 405 names only the first route's)."""
    path, routes = request.url.path, api_routes(request.app)
    exact = [r for r in routes if r.path_format == path]  # a fixed path (/v1/paths/import) is not an id
    matching = exact or [r for r in routes if compile_path(r.path_format)[0].fullmatch(path)]
    return ", ".join(sorted({m for r in matching for m in r.methods}))


Known = Callable[[BaseException], ZooError | None]


def install_error_handlers(
    app: FastAPI, below: tuple[type[BaseException], ...] = (), known: Known | None = None
) -> None:
    """The handlers, and for the app that reaches a database, Redis and a disk, the classes of
    exception from ``below`` there and what each ``known`` condition is as a ``ZooError``
    (``service.api.faults``); the HTTP workers' app has none of those, and none of their drivers."""
    known = known or (lambda e: None)

    @app.exception_handler(ZooError)
    async def _zoo(request: Request, e: ZooError) -> JSONResponse:
        if isinstance(cause := e.__cause__, OSError) and e.status == 507:  # (the database's own: its Database logs)
            DISK_FULL.failed(f"{request.method} {request.url.path}: {type(cause).__name__}: {cause}")  # once an episode
        return answer(request, e.status, e.title, e.detail, e.headers() or None)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        detail = "; ".join(f"{_loc(err)}: {err.get('msg')}" for err in errs[:5])
        return answer(request, 422, "Invalid input", detail or "request does not match the schema")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 400 and e.__cause__ is not None and (found := known(e.__cause__)) is not None:
            found.__cause__ = e.__cause__  # FastAPI's "error parsing the body": the disk full spooling an upload
            return await _zoo(request, found)
        headers = getattr(e, "headers", None)
        if e.status_code == 405:  # every method of the path (static files: Starlette's own answer)
            headers = {"Allow": _allowed(request)} if _allowed(request) else headers
        return answer(request, e.status_code, str(e.detail), str(e.detail), headers)

    async def _below(request: Request, e: Exception) -> JSONResponse:
        """What may come from below as a known condition (a full disk, a server away), handled here
        rather than as an ``Exception``: Starlette raises those again after answering, and the server
        then logs a traceback per request."""
        if (found := known(e)) is not None:
            found.__cause__ = e
            return await _zoo(request, found)
        return _internal(request, e)

    for kind in below:
        app.add_exception_handler(kind, _below)

    @app.exception_handler(Exception)
    async def _other(request: Request, e: Exception) -> JSONResponse:
        return _internal(request, e)


def _internal(request: Request, e: Exception) -> JSONResponse:
    """500 for a bug: the body says nothing of the error (driver text, hosts, paths), the log does."""
    ref = secrets.token_hex(4)
    log.error("unhandled error %s on %s %s", ref, request.method, request.url.path, exc_info=e)
    return answer(request, 500, "Internal error", f"an unexpected error (ref {ref}); the server's log has it")
