"""The audit log: every mutating call (POST, PUT, PATCH, DELETE; not predicts, which only read),
and every export (a GET, but a copy of a network leaves the service), writes one row after it is
answered: when, the key's id and tenant, the method and route, the target (what the route named with
``audit_target``, else the id in the path) and the status. Never a key or a body."""

from __future__ import annotations

import logging

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from zoo_store.core.errors import ZooError
from zoo_store.store.db import AuditRow, Database, new_id, page

log = logging.getLogger("zoo.audit")

MUTATING = {"POST", "PUT", "PATCH", "DELETE"}
EXPORT_SUFFIX = "/export"  # GET /v1/paths/{path_id}/export
READS = {  # POSTs that change nothing
    "/v1/paths/{path_id}/predict",
    "/v1/zoo/models/{model_id}/predict",
    "/v2/models/{model_id}/infer",
}


def _audited(scope: Scope) -> bool:
    return scope["method"] in MUTATING or (scope["method"] == "GET" and scope["path"].endswith(EXPORT_SUFFIX))


def audit_target(request: Request, target: str) -> None:
    """Name what the call acted on (what a POST made) as its audit row's target; a route with an id
    in its path need not: that id is the target."""
    request.state.audit_target = target


class AuditLog:
    def __init__(self, db: Database):
        self.db = db

    def write(
        self, key_id: str | None, tenant: str | None, method: str, route: str, target: str | None, status: int
    ) -> None:
        with self.db.session() as s:
            s.add(
                AuditRow(
                    id=new_id("au"),
                    key_id=key_id,
                    tenant=tenant,
                    method=method,
                    route=route[:200],
                    target=None if target is None else target[:200],
                    status=status,
                )
            )

    def list(self, cursor: str | None, limit: int, tenant: str | None = None) -> tuple[list[AuditRow], str | None]:
        with self.db.session() as s:
            return page(s, AuditRow, cursor, limit, tenant=tenant)


class AuditMiddleware:
    """A pure ASGI middleware around the app (the HTTP workers pass mutating calls through to it)."""

    def __init__(self, app: ASGIApp, log: AuditLog):
        self.app, self.log = app, log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _audited(scope):
            return await self.app(scope, receive, send)
        status = 500

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            route = getattr(scope.get("route"), "path", None)
            if route is not None and route not in READS:  # a path no route has is not a call worth a row
                state, in_path = scope.get("state", {}), (scope.get("path_params") or {}).values()
                caller = state.get("caller")
                target = state.get("audit_target") or next(iter(in_path), None)
                row = (
                    getattr(caller, "key_id", None),
                    getattr(caller, "tenant", None),
                    scope["method"],
                    route,
                    target,
                    status,
                )
                try:
                    await run_in_threadpool(self.log.write, *row)
                except ZooError as e:  # the database away (its Database logs that once), or its disk full
                    if status < 500:  # the call did something: this line is its record (a 5xx changed nothing)
                        log.warning(
                            "audit row not written (%s): key %s, tenant %s, %s %s, target %s, status %s", e.title, *row
                        )
