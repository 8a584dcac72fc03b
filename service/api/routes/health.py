from __future__ import annotations

from fastapi import APIRouter, Response

from service.api.deps import Svc
from service.api.errors import problem
from service.api.openapi import UNAVAILABLE
from service.common.metrics import render_metrics

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", responses=UNAVAILABLE)
def readyz(svc: Svc) -> object:
    """200 once this replica can serve: the zoo loaded. A shared service that is unreachable (the
    database, Redis) leaves it 200 with ``"status": "degraded"`` and a ``degraded`` field naming it:
    every replica shares them, so a 503 would take every replica out of the load balancer at once,
    warm predicts and all, for what they still answer (see docs/deploy.md)."""
    if not svc.ready.is_set():
        return problem(503, "Not ready", svc.startup_error or svc.loading)
    degraded = {}
    if not svc.db.ping():
        degraded["database"] = (
            "unreachable: warm predicts are answered from this replica's caches; "
            "what needs the database answers 503 with Retry-After"
        )
    if svc.quotas.buckets.unreachable():
        degraded["redis"] = (
            "unreachable: predict rates are held by each replica alone; compositions answer 503 with Retry-After"
        )
    auth = "on" if svc.settings.auth else "off (ZOO_AUTH=off: every caller is an admin)"
    body = {
        "status": "degraded" if degraded else "ready",
        "bases": len(svc.zoo.bases),
        "zoo_version": svc.zoo.version,
        "device": svc.zoo.device,
        "auth": auth,
    }
    return {**body, "degraded": degraded} if degraded else body


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}
    },
)
def metrics(svc: Svc) -> Response:
    return render_metrics(svc.metrics)
