"""The Open Inference Protocol (KServe v2) REST surface: each path is a model named by its id.
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
from zoo_store.core.manifest import Manifest

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


@router.get("/models/{path_id}")
def metadata(path_id: str, svc: Svc, caller: CallerDep) -> dict:
    """Inputs and outputs of a path: ``input`` [-1, C, H, W]; ``probabilities`` [-1, K], ``label`` [-1]."""
    return model_metadata(path_id, Manifest.model_validate(svc.store.path(path_id, caller.visible_to).manifest))


@router.get("/models/{path_id}/ready")
def model_ready(path_id: str, svc: ReadySvc, caller: CallerDep) -> dict:
    svc.store.path(path_id, caller.visible_to)  # 404 when there is no such path (for this tenant)
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


@router.post("/models/{path_id}/infer", openapi_extra=INFER_BODY, responses={**CONFLICT, **RATE_LIMITED})
async def infer(path_id: str, request: Request, svc: ReadySvc, caller: CallerDep) -> Response:
    """JSON tensors, or the binary tensor data extension (``Inference-Header-Content-Length``)."""
    arrived = time.monotonic()  # the batch wait counts from here
    entry = await run_in_threadpool(svc.admitted_entry, caller, path_id)
    m = entry.manifest
    req = parse_infer(await request.body(), request.headers.get(HEADER), m.input, svc.settings.max_predict_inputs)
    probs = await svc.batcher.submit(entry, torch.from_numpy(req.x), arrived)  # (N, K)
    body, headers = infer_response(path_id, m.labels, probs.numpy(), req)
    return Response(body, headers=headers)
