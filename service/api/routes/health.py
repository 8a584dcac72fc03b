from __future__ import annotations

from fastapi import APIRouter, Response

from service.api.deps import Svc
from service.api.errors import problem
from service.common.metrics import render_metrics
from service.api.openapi import UNAVAILABLE

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", responses=UNAVAILABLE)
def readyz(svc: Svc) -> object:
    db_ok = svc.db.ping()
    if db_ok and svc.ready.is_set():
        return {"status": "ready", "bases": len(svc.zoo.bases), "zoo_version": svc.zoo.version, "device": svc.zoo.device,
                "auth": "on" if svc.settings.auth else "off (ZOO_AUTH=off: every caller is an admin)"}  # fmt: skip
    why = "database unreachable" if not db_ok else (svc.startup_error or svc.loading)
    return problem(503, "Not ready", why)


@router.get("/metrics", response_class=Response,
            responses={200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}})  # fmt: skip
def metrics(svc: Svc) -> Response:
    return render_metrics(svc.metrics)
