"""An HTTP worker process of `zoo serve`: it parses, validates and decodes predict requests itself
and hands the tensors to the inference process over the device channel; every other route is
passed through to the inference process's app (on a Unix socket) unchanged.

`zoo serve` runs ``ZOO_HTTP_WORKERS`` of these (uvicorn's worker processes, one listening port);
``create_front_app`` is their factory."""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import orjson
import torch
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from service.api.app import FRONT_HEADER
from service.api.auth import KEY_TTL_S, bearer_key
from service.serve.channel import Arena, DeviceClient
from service.api.errors import install_error_handlers
from service.api.inputs import npy_array, npy_values, query_top_k, read_inputs
from service.api.limits import BodyLimit
from service.common.metrics import Metrics, RequestMetrics, render_metrics
from service.common.procs import die_with_supervisor
from service.api.routes.paths import predictions
from service.common.ttl import MISSING, TtlCache
from zoo_store.core.cards import InputSpec
from zoo_store.core.errors import InvalidInput, Unavailable
from zoo_store.core.settings import Settings

HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade", b"proxy-connection", b"host"}


class PathInfo:
    """What a worker needs to decode and answer a path's predicts (immutable: paths never change)."""

    def __init__(self, described: dict):
        self.input = InputSpec.model_validate(described["input"])
        self.labels = tuple(described["labels"])


def create_front_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    if settings.ipc_dir is None:
        raise RuntimeError("the front needs ZOO_IPC_DIR: it is started by `zoo serve`")
    die_with_supervisor()
    torch.set_num_threads(1)  # a worker's tensor work is small; the cores belong to the inference process
    metrics = Metrics()
    described = TtlCache(KEY_TTL_S, max_items=65_536)  # (key, path id) -> PathInfo: checked that recently
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        arena = Arena(settings.shm_slot_bytes, settings.shm_slots)
        state["device"] = DeviceClient(settings.ipc_dir / "device.sock", arena)
        no_pool = httpx.Limits(max_keepalive_connections=0)  # a connection per request: survives restarts
        transport = httpx.AsyncHTTPTransport(uds=str(settings.ipc_dir / "app.sock"), limits=no_pool)
        state["app"] = httpx.AsyncClient(transport=transport, base_url="http://zoo", timeout=None)
        gc.collect()
        gc.freeze()  # what a worker loaded at start is never scanned by the collector again
        try:
            yield
        finally:
            await state["app"].aclose()
            arena.close()

    app = FastAPI(title="zoo", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, settings=settings)
    app.add_middleware(RequestMetrics, metrics=metrics)

    async def path_info(path_id: str, key: str | None) -> PathInfo:
        """What decoding needs; asked once per key and path (the inference process checks the key
        and the tenant's access first, so a request that may not use the path is refused unread;
        a small ``.npy`` body is the exception, see ``first_npy_predict``)."""
        info = described.get((key, path_id))
        if info is MISSING:  # asked again after KEY_TTL_S: a revoked key is refused before its body is read
            info = described.put((key, path_id), PathInfo(await state["device"].describe(path_id, key)))
        return info

    @app.post("/v1/paths/{path_id}/predict")
    async def predict(path_id: str, request: Request) -> Response:
        key = bearer_key(request.headers.get("authorization"))
        info = described.get((key, path_id))
        if info is MISSING and _small_npy(request, settings.shm_slot_bytes):
            info, probs, top_k = await first_npy_predict(path_id, key, request)
        else:
            info = await path_info(path_id, key)
            x, top_k = await read_inputs(request, info.input, settings)  # (N, C, H, W) in [0, 1]
            probs = await state["device"].predict(path_id, x.numpy(), key)  # (N, K): checked again, and counted
        body = predictions(path_id, info.labels, probs, top_k)
        return Response(orjson.dumps(body), media_type="application/json")

    async def first_npy_predict(path_id: str, key: str | None, request: Request) -> tuple[PathInfo, torch.Tensor, int]:
        """A small ``.npy`` predict of a path this worker has not described for this key: one round
        trip, which checks the key, the array's C, H and W against the path's input, and answers
        with the path's description too (a cold path's predict costs no describe of its own; the
        body, at most one arena slot, is read before the key is checked, but a body refused here
        waits for the key's and the path's check, so errors come in the same order as otherwise)."""
        try:
            top_k, arr = query_top_k(request), npy_array(await request.body())
            x = npy_values(arr, None, settings) if arr.ndim == 4 else None
        except InvalidInput:
            await path_info(path_id, key)  # a key or path that may not be used is refused first, as for any body
            raise
        if x is None:  # not N x C x H x W: refused, naming the path's input
            x = npy_values(arr, (await path_info(path_id, key)).input, settings)
        probs, path = await state["device"].predict_described(path_id, x.numpy(), key)
        return described.put((key, path_id), PathInfo(path)), probs, top_k

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_route(request: Request) -> Response:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # under `zoo serve`: every process's metrics together
            return render_metrics(metrics)
        return await _pass(state["app"], request)  # workers started by hand: the inference process's

    @app.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
                   include_in_schema=False)  # fmt: skip
    async def passthrough(request: Request) -> Response:
        if request.url.path.startswith("/v1/paths/") and request.method in ("DELETE", "PUT"):  # access changes
            path_id = request.url.path.removeprefix("/v1/paths/").split("/")[0]
            described.drop(lambda k: k[1] != path_id)
        return await _pass(state["app"], request)

    return app


def _small_npy(request: Request, limit: int) -> bool:
    length = request.headers.get("content-length", "")
    ctype = request.headers.get("content-type", "")
    return ctype.startswith("application/octet-stream") and length.isascii() and length.isdigit() and int(length) <= limit


async def _pass(client: httpx.AsyncClient, request: Request) -> Response:
    """The request to the inference process's app, and its answer streamed back (server-sent events too)."""
    headers = [(k, v) for k, v in request.headers.raw if k.lower() not in HOP_BY_HOP]
    headers.append((FRONT_HEADER.encode(), b"1"))
    raw = request.scope.get("raw_path") or request.url.path.encode()  # as sent: still percent-encoded
    url = httpx.URL(raw_path=raw + (b"?" + request.scope["query_string"] if request.scope.get("query_string") else b""))
    body = await request.body()
    try:
        answer = await client.send(client.build_request(request.method, url, headers=headers, content=body), stream=True)
    except httpx.TransportError as e:
        raise Unavailable(f"the inference process is not answering (restarting?): {type(e).__name__}") from e
    response = StreamingResponse(answer.aiter_raw(), status_code=answer.status_code, background=BackgroundTask(answer.aclose))
    response.raw_headers = [(k.lower(), v) for k, v in answer.headers.raw if k.lower() not in HOP_BY_HOP]
    return response


def run_workers(host: str, port: int, workers: int, access_log: bool = False, log_level: str = "info") -> None:
    """``workers`` HTTP worker processes on one port (in this process when 1); returns when stopped."""
    import uvicorn

    uvicorn.run("service.serve.front:create_front_app", factory=True, host=host, port=port, log_level=log_level,
                access_log=access_log, workers=workers if workers > 1 else None)  # fmt: skip


if __name__ == "__main__":  # by hand or from tests, with ZOO_IPC_DIR set: python -m service.serve.front PORT WORKERS
    run_workers("127.0.0.1", int(sys.argv[1]), int(sys.argv[2]), log_level="warning")
