"""The one place where errors become HTTP responses: application/problem+json (RFC 9457)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute, iter_route_contexts
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from zoo_store.core.errors import ZooError

log = logging.getLogger("zoo.errors")


def problem(status: int, title: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    return JSONResponse(body, status_code=status, media_type="application/problem+json", headers=headers)


def _loc(err: dict) -> str:
    return ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"


def is_oip(path: str) -> bool:
    """The Open Inference Protocol surface, whose errors are ``{"error": ...}`` bodies."""
    return path == "/v2" or path.startswith("/v2/")


def answer(request: Request, status: int, title: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
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


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ZooError)
    async def _zoo(request: Request, e: ZooError) -> JSONResponse:
        return answer(request, e.status, e.title, e.detail, e.headers() or None)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        detail = "; ".join(f"{_loc(err)}: {err.get('msg')}" for err in errs[:5])
        return answer(request, 422, "Invalid input", detail or "request does not match the schema")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        headers = getattr(e, "headers", None)
        if e.status_code == 405:  # every method of the path (static files: Starlette's own answer)
            headers = {"Allow": _allowed(request)} if _allowed(request) else headers
        return answer(request, e.status_code, str(e.detail), str(e.detail), headers)

    @app.exception_handler(Exception)
    async def _other(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return answer(request, 500, "Internal error", f"{type(e).__name__}: {e}")
