from __future__ import annotations

from fastapi import APIRouter

from service.deps import ReadySvc
from service.schemas import Job
from zoo_store.datasets.tasks import resolve_labels
from zoo_store.errors import InvalidInput, NotFound
from zoo_store.methods.registry import get_method
from zoo_store.methods.spec import CompositionSpec

router = APIRouter(prefix="/v1/compositions", tags=["compositions"])


@router.post("", status_code=202)
def compose(spec: CompositionSpec, svc: ReadySvc) -> Job:
    """Validate a task spec, then queue the job that builds its path."""
    method = get_method(spec.method)
    method.validate(spec, svc.store.cards())
    if spec.task is not None:
        try:
            dataset = svc.store.dataset(spec.task.dataset)
        except NotFound as e:
            raise InvalidInput(f"task.dataset: {e.detail}") from e
        resolve_labels(dataset.labels, spec.task)
    row = svc.store.create_job(spec.model_dump(mode="json"))
    svc.runner.queue.put(row.id)
    return Job.of(row)
