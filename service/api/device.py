"""The inference process's answers to the HTTP workers' device-channel ops (``caller``, ``describe``
and ``predict``, see ``service.serve.channel``), next to the services they call: readiness, the
request's key and the tenant's access, the input's shape on a worker's first predict of a path,
then the batcher."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
from starlette.concurrency import run_in_threadpool

from service.api.inputs import check_npy_shape
from service.api.oip import check_input_shape
from zoo_store.core.cards import InputSpec
from zoo_store.core.errors import BadRequest, Unavailable

if TYPE_CHECKING:
    from service.api.state import Services

SHAPE_CHECKS = {"npy": check_npy_shape, "oip": check_input_shape}  # a first predict's form -> its shape check


class DeviceOps:
    """The channel's handler: (header, tensor bytes) -> (answer header, answer bytes)."""

    def __init__(self, svc: Services):
        self.svc = svc

    async def __call__(self, header: dict[str, Any], data: memoryview) -> tuple[dict[str, Any], bytes]:
        svc = self.svc
        if header["op"] == "caller":  # a passed-through request's key, checked before its body is read
            await run_in_threadpool(svc.auth.caller, header.get("key"))  # (works before the zoo is loaded)
            return {}, b""
        if not svc.ready.is_set():
            raise Unavailable(svc.startup_error or "the zoo is still loading; see /readyz")
        # a path's id, or a base's (``"base": true``: /v1/zoo/models/{id}/predict, or /v2 naming a base)
        path_id, base, arrived = header["path"], bool(header.get("base")), time.monotonic()
        # the request's bearer key, checked here (off the event loop: it may ask the database, or Redis)
        if header["op"] == "describe":  # not a use of the path: the predict that follows is
            if base:
                entry = await run_in_threadpool(svc.describe_base, header.get("key"), path_id)
                return {"path": described(entry.input, entry.labels)}, b""
            m = await run_in_threadpool(svc.describe, header.get("key"), path_id)
            return {"path": described(m.input, m.labels)}, b""
        if header["op"] != "predict":
            raise BadRequest(f"unknown channel op {header['op']!r}")
        entry = await run_in_threadpool(svc.keyed_entry, header.get("key"), path_id, base)
        shape = header["shape"]  # (N, C, H, W)
        if header.get("describe"):  # the worker has not seen the path: it could not check the shape
            SHAPE_CHECKS[header.get("form", "npy")](shape, entry.input)
        buffer = bytearray(data) if data.readonly else data  # a payload: copied; an arena slot: used in place
        x = torch.frombuffer(buffer, dtype=torch.float32).view(shape)
        probs = await svc.batcher.submit(entry, x, arrived)  # (N, K): the slot is read before this returns
        answer: dict[str, Any] = {"shape": list(probs.shape)}
        if header.get("describe"):
            answer["path"] = described(entry.input, entry.labels)
        return answer, probs.numpy().tobytes()


def described(spec: InputSpec, labels: tuple[str, ...]) -> dict[str, Any]:
    """What a worker needs of a path (or a base) to decode and answer its predicts."""
    return {"input": spec.model_dump(mode="json"), "labels": list(labels)}
