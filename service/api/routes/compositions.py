from __future__ import annotations

from fastapi import APIRouter, Request

from service.api.audit import audit_target
from service.api.auth import CallerDep
from service.api.deps import ReadySvc
from service.api.openapi import FORBIDDEN
from service.api.schemas import Job
from zoo_store.core.errors import InvalidInput, NotFound
from zoo_store.core.spec import CompositionSpec
from zoo_store.datasets.tasks import resolve_labels
from zoo_store.methods import get_method

router = APIRouter(prefix="/v1/compositions", tags=["compositions"])


@router.post("", status_code=202, responses=FORBIDDEN)
def compose(spec: CompositionSpec, request: Request, svc: ReadySvc, caller: CallerDep) -> Job:
    """Validate a task spec, then queue the job that builds its path (this key's tenant's job and path)."""
    method = get_method(spec.method)
    method.check(spec, svc.store.cards())
    if spec.task is not None:
        try:
            dataset = svc.store.dataset(spec.task.dataset, caller.visible_to)
        except NotFound as e:
            raise InvalidInput(f"task.dataset: {e.detail}") from e
        resolve_labels(dataset.labels, spec.task)
    svc.quotas.new_job(caller)
    row = svc.runner.submit(spec.model_dump(mode="json"), caller.tenant)
    audit_target(request, row.id)
    return Job.of(row)
