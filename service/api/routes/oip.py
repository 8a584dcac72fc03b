"""The Open Inference Protocol (KServe v2) REST surface: each path is a model named by its id, and
so is each base (by itself, on its own labels; a base's id never looks like a path's: ``is_path_id``).
Same runtime, batching and limits as ``/v1/paths/{id}/predict``; errors as ``{"error": ...}``."""

from __future__ import annotations

import time

import torch
from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from service.api.auth import CallerDep
from service.api.deps import ReadySvc, Svc
from service.api.oip import HEADER, infer_response, model_metadata, parse_infer
from service.api.openapi import CONFLICT, RATE_LIMITED, UNAVAILABLE
from zoo_store.core.errors import Unavailable
from zoo_store.core.manifest import Manifest, is_path_id

router = APIRouter(prefix="/v2", tags=["open inference protocol"])


@router.get("")
def server_metadata(_: CallerDep) -> dict:
    return {"name": "zoo", "version": "0.1.0", "extensions": ["binary_tensor_data"]}


@router.get("/health/live")
def live(_: CallerDep) -> dict:
    return {}


@router.get("/health/ready", responses=UNAVAILABLE)
def ready(svc: Svc, _: CallerDep) -> dict:
    if not svc.ready.is_set():
        raise Unavailable(svc.startup_error or "the zoo is still loading")
    return {}


@router.get("/models/{model_id}")
def metadata(model_id: str, svc: Svc, caller: CallerDep) -> dict:
    """Inputs and outputs of a path, or of a base (an id without ``p_``): ``input`` [-1, C, H, W];
    ``probabilities`` [-1, K], ``label`` [-1]."""
    if not is_path_id(model_id):
        card = svc.store.card(model_id)
        return model_metadata(model_id, card.input, card.labels, "zoo_base")
    m = Manifest.model_validate(svc.store.path(model_id, caller.visible_to).manifest)
    return model_metadata(model_id, m.input, m.labels, f"zoo_{m.method}")


@router.get("/models/{model_id}/ready")
def model_ready(model_id: str, svc: ReadySvc, caller: CallerDep) -> dict:
    if is_path_id(model_id):
        svc.store.path(model_id, caller.visible_to)  # 404 when there is no such path (for this tenant)
    else:
        svc.base_entry(model_id)  # 404 when there is no such base; loaded when registered elsewhere
    return {}


INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "inputs": {"type": "array", "items": {"type": "object"}},
                        "outputs": {"type": "array", "items": {"type": "object"}},
                        "parameters": {"type": "object"},
                    },
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.post("/models/{model_id}/infer", openapi_extra=INFER_BODY, responses={**CONFLICT, **RATE_LIMITED})
async def infer(model_id: str, request: Request, svc: ReadySvc, caller: CallerDep) -> Response:
    """JSON tensors, or the binary tensor data extension (``Inference-Header-Content-Length``)."""
    arrived = time.monotonic()  # the batch wait counts from here
    admit = svc.admitted_entry if is_path_id(model_id) else svc.admitted_base
    entry = await run_in_threadpool(admit, caller, model_id)
    req = parse_infer(await request.body(), request.headers.get(HEADER), entry.input, svc.settings.max_predict_inputs)
    probs = await svc.batcher.submit(entry, torch.from_numpy(req.x), arrived)  # (N, K)
    body, headers = infer_response(model_id, entry.labels, probs.numpy(), req)
    return Response(body, headers=headers)
