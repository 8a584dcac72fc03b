from __future__ import annotations

import io
from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile
from PIL import Image
from starlette.concurrency import run_in_threadpool

from service.api.audit import audit_target
from service.api.auth import CallerDep
from service.api.deps import Cursor, Limit, Svc
from service.api.openapi import FORBIDDEN
from service.api.schemas import Dataset, Page, Samples
from zoo_store.core.errors import PayloadTooLarge
from zoo_store.datasets.upload import Limits, parse_upload

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


@router.get("")
def list_datasets(svc: Svc, caller: CallerDep, cursor: Cursor = None, limit: Limit = 100) -> Page[Dataset]:
    """The built-in datasets and the ones this key's tenant uploaded (an admin: every upload)."""
    rows, nxt = svc.store.list_datasets(cursor, limit, caller.visible_to)
    return Page(items=[Dataset.of(r) for r in rows], next_cursor=nxt)


@router.get("/{dataset_id}")
def get_dataset(dataset_id: str, svc: Svc, caller: CallerDep) -> Dataset:
    return Dataset.of(svc.store.dataset(dataset_id, caller.visible_to))


@router.get("/{dataset_id}/samples")
def dataset_sample_labels(
    dataset_id: str, svc: Svc, caller: CallerDep, n: Annotated[int, Query(ge=1, le=32)] = 8
) -> Samples:
    """The labels of the first ``n`` held-out images, and the link to their strip (the dashboard's grid)."""
    svc.store.dataset(dataset_id, caller.visible_to)
    arrays = svc.store.arrays(dataset_id)
    labels = [arrays.labels[int(v)] for v in arrays.test_y[:n]]
    return Samples(labels=labels, png=f"/v1/datasets/{dataset_id}/samples.png?n={len(labels)}")


@router.get(
    "/{dataset_id}/samples.png",
    response_class=Response,
    responses={200: {"description": "a strip of held-out images", "content": {"image/png": {}}}},
)
def dataset_samples(
    dataset_id: str, svc: Svc, caller: CallerDep, n: Annotated[int, Query(ge=1, le=32)] = 8
) -> Response:
    """The first ``n`` held-out images side by side, as one PNG (the dashboard shows it)."""
    svc.store.dataset(dataset_id, caller.visible_to)
    x = svc.store.arrays(dataset_id).test_x[:n]  # (n, C, H, W) uint8
    strip = np.concatenate(list(x), axis=2).transpose(1, 2, 0)  # (H, n*W, C)
    img = Image.fromarray(strip[:, :, 0] if strip.shape[2] == 1 else strip)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return Response(buf.getvalue(), media_type="image/png")


@router.post("", status_code=201, responses=FORBIDDEN)
async def upload_dataset(
    request: Request,
    svc: Svc,
    caller: CallerDep,
    file: Annotated[UploadFile, File(description="an ImageFolder zip, or an .npz with x, y, labels")],
    name: Annotated[str | None, Form(max_length=200)] = None,
) -> Dataset:
    limit = svc.settings.max_upload_bytes
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"upload is larger than {limit} bytes")
    parsed = await run_in_threadpool(parse_upload, data, file.filename or "", Limits(max_bytes=limit))
    svc.quotas.new_dataset(caller, parsed.x.nbytes + parsed.y.nbytes)
    row = svc.store.add_dataset(name or file.filename or "upload", parsed.x, parsed.y, parsed.labels, caller.tenant)
    audit_target(request, row.id)
    return Dataset.of(row)
