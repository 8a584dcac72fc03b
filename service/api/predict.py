"""The ``/v1`` predict answer shared by a path's route and a base's route: one body format, one batcher."""

from __future__ import annotations

import orjson
import torch
from fastapi import Request, Response

from service.api.bodies import predictions
from service.api.inputs import read_inputs
from service.api.state import Services
from service.runtime.cache import Entry

# a predict's third body format, beside JSON and multipart: one .npy array (declared in the OpenAPI)
NPY_BODY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}


async def answer_predict(svc: Services, entry: Entry, request: Request, arrived: float) -> Response:
    """A ``/v1`` predict of an admitted path or base: its body decoded against the entry's input,
    batched, and the top-k of each input. ``arrived``: the request's ``time.monotonic()``."""
    x, top_k = await read_inputs(request, entry.input, svc.settings)  # (N, C, H, W) in [0, 1]
    probs = await svc.batcher.submit(entry, torch.from_numpy(x), arrived)  # (N, K)
    body = predictions(entry.path_id, entry.labels, probs.numpy(), top_k)
    return Response(orjson.dumps(body), media_type="application/json")
