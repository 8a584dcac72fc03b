from __future__ import annotations

import orjson
import torch
from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from service.deps import Cursor, Limit, ReadySvc, Svc
from service.inputs import read_inputs
from service.openapi import CONFLICT
from service.runtime import validate_bundle
from service.schemas import Page, Path, PredictResponse
from zoo_store.archs.standalone import export_network
from zoo_store.errors import BadRequest, Conflict
from zoo_store.methods.registry import get_method, method_names
from zoo_store.paths import decode_bundle

router = APIRouter(prefix="/v1/paths", tags=["paths"])


@router.get("")
def list_paths(svc: Svc, cursor: Cursor = None, limit: Limit = 100) -> Page[Path]:
    rows, nxt = svc.store.list_paths(cursor, limit)
    return Page(items=[Path.of(r) for r in rows], next_cursor=nxt)


@router.get("/{path_id}")
def get_path(path_id: str, svc: Svc) -> Path:
    return Path.of(svc.store.path(path_id))


@router.delete("/{path_id}", status_code=204)
def delete_path(path_id: str, svc: Svc) -> Response:
    svc.store.delete_path(path_id)
    svc.cache.evict(path_id)
    return Response(status_code=204)


@router.get("/{path_id}/bundle", response_class=Response)
def get_bundle(path_id: str, svc: Svc) -> Response:
    row = svc.store.path(path_id)
    return Response(
        row.bundle,
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{row.id}.zoopath"'},
    )


@router.get("/{path_id}/network", response_class=Response, responses=CONFLICT)
async def get_network(path_id: str, svc: ReadySvc) -> Response:
    """The path as a standalone dense network (safetensors + card), for paths that are one (resample)."""
    entry = await run_in_threadpool(svc.cache.get, path_id)
    if not get_method(entry.manifest.method).standalone:
        which = [n for n in method_names() if get_method(n).standalone]
        raise Conflict(f"a {entry.manifest.method!r} path runs on its resident bases and is not a standalone network; "
                       f"only {' and '.join(which)} paths are")  # fmt: skip
    card = svc.zoo.bases[entry.manifest.bases[0].id][0]
    data = await run_in_threadpool(export_network, entry.module, card, path_id)
    return Response(data, media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{path_id}.safetensors"'})  # fmt: skip


@router.post("/import", status_code=201, openapi_extra={"requestBody": {"content": {"application/octet-stream": {}}}},
             responses=CONFLICT)  # fmt: skip
async def import_bundle(request: Request, response: Response, svc: ReadySvc) -> Path:
    """Import a ``.zoopath`` bundle (raw bytes). 201 when new, 200 when the path already exists."""
    data = await request.body()
    if not data:
        raise BadRequest("empty body: send the .zoopath bundle bytes")
    bundle = decode_bundle(data)
    await run_in_threadpool(validate_bundle, bundle, svc.zoo)
    row, created = svc.store.save_path(bundle)
    if not created:
        response.status_code = 200
    return Path.of(row)


NPY_BODY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}


@router.post("/{path_id}/predict", response_model=PredictResponse, openapi_extra={"requestBody": {"content": NPY_BODY}},
             responses=CONFLICT)  # fmt: skip
async def predict(path_id: str, request: Request, svc: ReadySvc) -> Response:
    """JSON ``{"inputs": [{"tensor"|"image"}], "top_k"}``, multipart image files (field ``files``),
    or ``application/octet-stream``: one ``.npy`` array N x C x H x W, float32 in [0, 1] or uint8
    (``?top_k=`` in the query)."""
    svc.batcher.check_room()  # a full queue is refused before any work is done
    entry = await svc.cache.entry(path_id)  # loaded on first use
    manifest = entry.manifest
    x, top_k = await read_inputs(request, manifest.input, svc.settings)
    probs = await svc.batcher.submit(entry, x)  # (N, K)
    return Response(orjson.dumps(predictions(path_id, manifest.labels, probs, top_k)), media_type="application/json")


def predictions(path_id: str, labels: tuple[str, ...], probs: torch.Tensor, top_k: int) -> dict:
    """The ``PredictResponse`` body as plain data (encoded once, no model round trip on the hot path)."""
    scores, idx = probs.topk(min(top_k, len(labels)), dim=1)  # (N, k), (N, k)
    preds = []
    for s_row, i_row in zip(scores.tolist(), idx.tolist(), strict=True):
        top = [{"label": labels[i], "score": s} for s, i in zip(s_row, i_row, strict=True)]
        preds.append({"label": top[0]["label"], "score": top[0]["score"], "top_k": top})
    return {"path_id": path_id, "predictions": preds}
