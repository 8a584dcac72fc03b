from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from service.api.audit import audit_target
from service.api.auth import CallerDep
from service.api.bodies import PredictResponse
from service.api.deps import Cursor, Limit, ReadySvc, Svc
from service.api.openapi import CONFLICT, FORBIDDEN, RATE_LIMITED
from service.api.predict import NPY_BODY, answer_predict
from service.api.schemas import Evaluation, Page, Path, Sharing, SharingIn
from service.api.state import Services
from service.runtime.zoo import validate_bundle
from zoo_store.archs.export import Format
from zoo_store.archs.standalone import export_network
from zoo_store.core.bundle import decode_bundle
from zoo_store.core.errors import BadRequest, Conflict, Forbidden, InvalidInput, NotFound
from zoo_store.datasets.tasks import to_input
from zoo_store.methods import get_method, method_names
from zoo_store.store.tenancy import Caller

router = APIRouter(prefix="/v1/paths", tags=["paths"])


@router.get("")
def list_paths(svc: Svc, caller: CallerDep, cursor: Cursor = None, limit: Limit = 100) -> Page[Path]:
    """The paths this key's tenant owns or was granted, and the public ones (an admin: all)."""
    rows, nxt = svc.store.list_paths(cursor, limit, caller.visible_to)
    return Page(items=[Path.of(r) for r in rows], next_cursor=nxt)


@router.get("/{path_id}")
def get_path(path_id: str, svc: Svc, caller: CallerDep) -> Path:
    return Path.of(svc.store.path(path_id, caller.visible_to))


@router.get("/{path_id}/evaluation")
async def evaluate_path(
    path_id: str,
    svc: ReadySvc,
    caller: CallerDep,
    dataset: Annotated[str, Query(description="a dataset holding some of the path's labels", max_length=200)],
    n: Annotated[int, Query(ge=1, le=2000, description="at most this many held-out images")] = 500,
) -> Evaluation:
    """The path's predictions on the held-out (test) images of ``dataset`` whose labels it has, as a
    confusion matrix (the dashboard's path page). Labels match by name. Each predict-sized piece is
    admitted as a predict is (rate limits, quotas)."""
    labels = (await run_in_threadpool(svc.store.path, path_id, caller.visible_to)).manifest["labels"]
    images, y = await run_in_threadpool(_held_out, svc, caller, dataset, labels, n)  # (n, C, H, W) uint8, (n,)
    step, predicted = svc.settings.max_predict_inputs, []
    for i in range(0, len(images), step):
        arrived = time.monotonic()
        entry = await run_in_threadpool(svc.admitted_entry, caller, path_id)
        x = await run_in_threadpool(to_input, images[i : i + step], entry.input)  # (b, C', S, S) in [0, 1]
        predicted.append((await svc.batcher.submit(entry, x, arrived)).argmax(1).numpy())  # (b,)
    k = len(labels)
    matrix = np.zeros((k, k), dtype=np.int64)
    np.add.at(matrix, (y, np.concatenate(predicted)), 1)
    accuracy = float(np.trace(matrix) / len(y))
    return Evaluation(dataset=dataset, labels=list(labels), samples=len(y), accuracy=accuracy, matrix=matrix.tolist())


def _held_out(
    svc: Services, caller: Caller, dataset: str, labels: Sequence[str], n: int
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` test images of ``dataset`` with one of ``labels`` (uint8, as stored), and each
    one's index in ``labels``."""
    svc.store.dataset(dataset, caller.visible_to)
    arrays = svc.store.arrays(dataset)
    index = {lab: i for i, lab in enumerate(labels)}
    mine = np.array([index.get(lab, -1) for lab in arrays.labels], dtype=np.int64)[arrays.test_y]  # (N,)
    keep = np.flatnonzero(mine >= 0)[:n]
    if not len(keep):
        raise InvalidInput(f"dataset {dataset!r} has no held-out images of the path's labels {list(labels)}")
    return arrays.test_x[keep], mine[keep]


@router.delete("/{path_id}", status_code=204, responses=FORBIDDEN)
def delete_path(path_id: str, svc: Svc, caller: CallerDep) -> Response:
    """An owner: the path is no longer its own, and it is deleted with its last owner. An admin:
    deleted for every owner. A tenant it was only granted to: 403."""
    if svc.store.delete_path(path_id, caller.visible_to):
        svc.cache.evict(path_id)
        svc.exports.forget(path_id)
    svc.forget_access(path_id)
    return Response(status_code=204)


@router.get("/{path_id}/sharing", responses=FORBIDDEN)
def get_sharing(path_id: str, svc: Svc, caller: CallerDep) -> Sharing:
    """Its owners, and whom this key's tenant lets read and predict it (an admin: every owner's
    grants). For its owners and admins; a tenant it is shared with gets 403."""
    _owner_or_admin(svc, caller, path_id)
    return Sharing(**svc.store.sharing(path_id, caller.visible_to))


@router.put("/{path_id}/sharing", responses=FORBIDDEN)
def put_sharing(path_id: str, sharing: SharingIn, svc: Svc, caller: CallerDep) -> Sharing:
    """Replace whom this key's tenant lets read and predict the path: every tenant (``public``)
    and/or the named ones. Each owner's grants are its own (another owner's stay as they are); an
    owner that deletes the path takes its grants with it."""
    _owner_or_admin(svc, caller, path_id)
    out = svc.store.share(path_id, caller.tenant, sharing.public, sharing.tenants)
    svc.forget_access(path_id)
    return Sharing(**out)


def _owner_or_admin(svc: Services, caller: Caller, path_id: str) -> None:
    """404 unless the caller sees the path (ids only, not the bundle read); 403 for a reader."""
    role = (
        ("owner" if svc.store.path_exists(path_id) else None)
        if caller.admin
        else svc.store.role(path_id, caller.tenant)
    )
    if role is None:
        raise NotFound(f"no path {path_id!r}")
    if role != "owner":
        raise Forbidden(
            f"only an owner of path {path_id!r} may see or change whom it is shared with; "
            f"tenant {caller.tenant!r} reads it"
        )


@router.get("/{path_id}/bundle", response_class=Response)
def get_bundle(path_id: str, svc: Svc, caller: CallerDep) -> Response:
    row = svc.store.path(path_id, caller.visible_to)
    return Response(
        row.bundle,
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{row.id}.zoopath"'},
    )


@router.get("/{path_id}/network", response_class=Response, responses=CONFLICT)
async def get_network(path_id: str, svc: ReadySvc, caller: CallerDep) -> Response:
    """The path as a standalone dense network (safetensors + card), for paths that are one (resample)."""
    svc.check_access(caller, path_id)
    entry = await run_in_threadpool(svc.cache.get, path_id)
    manifest = entry.path_manifest
    if not get_method(manifest.method).standalone:
        which = [n for n in method_names() if get_method(n).standalone]
        raise Conflict(
            f"a {manifest.method!r} path runs on its resident bases and is not a standalone network; "
            f"only {' and '.join(which)} paths are"
        )
    card = svc.zoo.bases[manifest.bases[0].id][0]
    data = await run_in_threadpool(export_network, entry.module, card, path_id)
    return Response(
        data,
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{path_id}.safetensors"'},
    )


@router.get(
    "/{path_id}/export",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "the exported file"}},
)
async def export(path_id: str, svc: ReadySvc, caller: CallerDep, format: Format = "onnx") -> Response:  # noqa: A002
    """The path as one standalone file any runtime loads without this project: ``onnx`` (opset 18, for
    ONNX Runtime) or ``pt2`` (``torch.export.load``). Input ``input`` (N x C x H x W, float in [0, 1]),
    output ``probabilities`` (N x K), batch axis dynamic; labels and input spec in its metadata. Built
    on first ask (seconds), then the same bytes from a file. Anyone who may use the path may export it
    (the audit log records each). An operator an exporter cannot express: 422 naming it."""
    svc.check_access(caller, path_id)
    out = await run_in_threadpool(svc.exports.file, path_id, format)
    name = f"{path_id}.{format}"
    if isinstance(out, bytes):  # not kept: the disk is full
        disposition = {"Content-Disposition": f'attachment; filename="{name}"'}
        return Response(out, media_type="application/octet-stream", headers=disposition)
    return FileResponse(out, media_type="application/octet-stream", filename=name)


@router.post(
    "/import",
    status_code=201,
    openapi_extra={"requestBody": {"content": {"application/octet-stream": {}}}},
    responses={**CONFLICT, **FORBIDDEN},
)
async def import_bundle(request: Request, response: Response, svc: ReadySvc, caller: CallerDep) -> Path:
    """Import a ``.zoopath`` bundle (raw bytes), owned by this key's tenant from then on. 201 when
    new to the tenant, 200 when it owned the path already."""
    data = await request.body()
    if not data:
        raise BadRequest("empty body: send the .zoopath bundle bytes")
    bundle = decode_bundle(data)
    if svc.store.role(bundle.id, caller.tenant) != "owner":
        svc.quotas.new_path(caller, len(data))
    await run_in_threadpool(validate_bundle, bundle, svc.zoo)
    row, created = svc.store.save_path(bundle, caller.tenant)
    svc.forget_access(row.id)
    audit_target(request, row.id)
    if not created:
        response.status_code = 200
    return Path.of(row)


@router.post(
    "/{path_id}/predict",
    response_model=PredictResponse,
    openapi_extra={"requestBody": {"content": NPY_BODY}},
    responses={**CONFLICT, **RATE_LIMITED},
)
async def predict(path_id: str, request: Request, svc: ReadySvc, caller: CallerDep) -> Response:
    """JSON ``{"inputs": [{"tensor"|"image"}], "top_k"}``, multipart image files (field ``files``),
    or ``application/octet-stream``: one ``.npy`` array N x C x H x W, float32 in [0, 1] or uint8
    (``?top_k=`` in the query)."""
    arrived = time.monotonic()  # the batch wait counts from here
    entry = await run_in_threadpool(svc.admitted_entry, caller, path_id)
    return await answer_predict(svc, entry, request, arrived)
