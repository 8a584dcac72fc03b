"""An HTTP worker process of `zoo serve`: it parses, validates and decodes predict requests itself
(``/v1/paths/{id}/predict``, a base's ``/v1/zoo/models/{id}/predict`` and the Open Inference
Protocol's ``/v2/models/{id}/infer`` of either, with numpy and Pillow: no torch here) and hands the
tensors to the inference process over the device channel; every other route is passed through to
the inference process's app (on a Unix socket) unchanged.

`zoo serve` runs ``ZOO_HTTP_WORKERS`` of these (uvicorn's worker processes, one listening port);
``create_front_app`` is their factory."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
import numpy as np
import orjson
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect

from service.api.bodies import predictions
from service.api.errors import answer as error_answer
from service.api.errors import install_error_handlers
from service.api.inputs import npy_array, npy_values, query_top_k, read_inputs
from service.api.limits import BodyLimit
from service.api.oip import HEADER as OIP_HEADER
from service.api.oip import InferRequest, infer_response, parse_infer
from service.common.edge import FRONT_HEADER, KEY_TTL_S, bearer_key
from service.common.metrics import Metrics, RequestMetrics, render_metrics
from service.common.procs import die_with_supervisor
from service.common.ttl import MISSING, TtlCache
from service.serve.channel import Arena, DeviceClient
from service.serve.edge_http import EdgeProtocol
from zoo_store.core.cards import InputSpec
from zoo_store.core.errors import InvalidInput, Unauthorized, Unavailable, ZooError
from zoo_store.core.manifest import is_path_id
from zoo_store.core.settings import Settings

# a body and the path's input (None: not known yet) -> (N, C, H, W) float32 in [0, 1], and what else
# the request asks (its top_k, its outputs); raises the ZooError that refuses the body
Decode = Callable[[bytes, InputSpec | None], tuple[np.ndarray, object]]
SMALL_JSON_BYTES = 16 * 1024  # a JSON infer body decoded before its key is checked (one round trip) up to this size
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
    metrics = Metrics()
    described = TtlCache(KEY_TTL_S, max_items=65_536)  # (key, path or base id, base) -> PathInfo: checked that recently
    callers = TtlCache(KEY_TTL_S, max_items=65_536)  # key -> True: a live key that recently
    EdgeProtocol.configure(settings)  # this worker's header limit, read timeout and drain
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

    async def path_info(path_id: str, key: str | None, base: bool) -> PathInfo:
        """What decoding needs; asked once per key and path (or base) (the inference process checks
        the key and the tenant's access first, so a request that may not use the path is refused
        unread; a small body is the exception, see ``first_predict``)."""
        info = described.get((key, path_id, base))
        if info is MISSING:  # asked again after KEY_TTL_S: a revoked key is refused before its body is read
            info = described.put((key, path_id, base), PathInfo(await state["device"].describe(path_id, key, base)))
        return info

    @app.post("/v1/paths/{path_id}/predict")
    async def predict(path_id: str, request: Request) -> Response:
        return await predict_v1(path_id, request, base=False)

    @app.post("/v1/zoo/models/{model_id}/predict")
    async def predict_base(model_id: str, request: Request) -> Response:
        return await predict_v1(model_id, request, base=True)

    async def predict_v1(path_id: str, request: Request, base: bool) -> Response:
        """A ``/v1`` predict of a path, or of a base by itself (``base``): same bodies, same checks."""
        key = bearer_key(request.headers.get("authorization"))
        first = described.get((key, path_id, base)) is MISSING
        if first and _small(request, settings.shm_slot_bytes, "application/octet-stream"):

            def decode(body: bytes, spec: InputSpec | None) -> tuple[np.ndarray, int]:
                top_k, arr = query_top_k(request), npy_array(body)
                if spec is None and arr.ndim != 4:  # refused by the second try, naming the path's input
                    raise InvalidInput("not N x C x H x W")
                return npy_values(arr, spec, settings), top_k

            info, probs, top_k = await first_predict(path_id, key, request, decode, "npy", base)
        else:
            info = await path_info(path_id, key, base)
            x, top_k = await read_inputs(request, info.input, settings)  # (N, C, H, W) in [0, 1]
            probs = await state["device"].predict(path_id, x, key, base)  # (N, K): checked again, and counted
        body = predictions(path_id, info.labels, probs, top_k)
        return Response(orjson.dumps(body), media_type="application/json")

    @app.post("/v2/models/{model_id}/infer")
    async def infer(model_id: str, request: Request) -> Response:
        """The Open Inference Protocol's infer of a path or a base (``is_path_id``), decoded here like a
        ``/v1`` predict (same checks, in the same order, with the same answers as the inference
        process's own route)."""
        key, base = bearer_key(request.headers.get("authorization")), not is_path_id(model_id)
        length = request.headers.get(OIP_HEADER)

        def decode(body: bytes, spec: InputSpec | None) -> tuple[np.ndarray, InferRequest]:
            req = parse_infer(body, length, spec, settings.max_predict_inputs)
            return req.x, req

        # the one-trip shortcut decodes before the key is checked: only for what is cheap to decode (the
        # binary extension's small JSON header, or a small JSON body), so no one can keep a worker busy for free
        cheap = _small(request, settings.shm_slot_bytes) if length is not None else _small(request, SMALL_JSON_BYTES)
        if described.get((key, model_id, base)) is MISSING and cheap:
            info, probs, req = await first_predict(model_id, key, request, decode, "oip", base)
        else:
            info = await path_info(model_id, key, base)
            x, req = decode(await request.body(), info.input)  # (N, C, H, W) in [0, 1]
            probs = await state["device"].predict(model_id, x, key, base)  # (N, K): checked again, and counted
        body, headers = infer_response(model_id, info.labels, probs, req)
        return Response(body, headers=headers)

    async def first_predict(
        path_id: str, key: str | None, request: Request, decode: Decode, form: str, base: bool
    ) -> tuple[PathInfo, np.ndarray, object]:
        """A small predict of a path (a base when ``base``) this worker has not described for this
        key: one round trip, which checks the key, the input's C, H and W against the path's (the
        error naming ``form``'s input) and answers with the path's description too (a cold path's
        predict costs no describe of its own). ``decode(body, None)`` leaves C, H and W to the
        inference process. The body, at most one arena slot, is read before the key is checked, but
        a body refused here waits for the key's and the path's check and is decoded again knowing the
        path's input, so errors come in the same order, and say the same, as otherwise. -> (path,
        probabilities, what ``decode`` gave besides the input)."""
        body = await request.body()
        try:
            x, extra = decode(body, None)
        except ZooError:
            info = await path_info(path_id, key, base)  # a key or path that may not be used is refused first
            x, extra = decode(body, info.input)  # refused again, naming the path's input (or decoded)
            return info, await state["device"].predict(path_id, x, key, base), extra
        probs, path = await state["device"].predict_described(path_id, x, key, form, base)
        return described.put((key, path_id, base), PathInfo(path)), probs, extra

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_route(request: Request) -> Response:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # under `zoo serve`: every process's metrics together
            return render_metrics(metrics)
        return await _pass(state["app"], request)  # workers started by hand: the inference process's

    @app.api_route(
        "/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"], include_in_schema=False
    )
    async def passthrough(request: Request) -> Response:
        if _needs_key(request.url.path):  # the key first: a request that may not come in is refused unread
            key = bearer_key(request.headers.get("authorization"))
            if callers.get(key) is MISSING:
                try:
                    callers.put(key, await state["device"].caller(key))
                except Unauthorized as e:  # its body unread: not kept alive to read (and drop) it
                    refused = error_answer(request, e.status, e.title, e.detail, e.headers())
                    if _has_body(request):
                        refused.headers["connection"] = "close"
                    return refused
        if request.url.path.startswith("/v1/paths/") and request.method in ("DELETE", "PUT"):  # access changes
            path_id = request.url.path.removeprefix("/v1/paths/").split("/")[0]
            described.drop(lambda k: k[1] != path_id)
        return await _pass(state["app"], request)

    return app


KEYLESS = frozenset({"/v1/keys/exchange"})  # its body's sign-in token is the credential


def _needs_key(path: str) -> bool:
    """Whether the app asks a key of a route: all of /v1 and /v2 but a sign-in token's exchange (not
    /healthz, /readyz, /metrics, the dashboard's files, /docs, /redoc, /openapi.json)."""
    return (path.startswith("/v1/") and path not in KEYLESS) or path == "/v2" or path.startswith("/v2/")


def _has_body(request: Request) -> bool:
    length = request.headers.get("content-length", "0")
    return "transfer-encoding" in request.headers or length != "0"


def _small(request: Request, limit: int, ctype: str = "") -> bool:
    """A body of at most ``limit`` bytes (by its Content-Length), of content type ``ctype`` when given."""
    length = request.headers.get("content-length", "")
    ok_type = request.headers.get("content-type", "").startswith(ctype)
    return ok_type and length.isascii() and length.isdigit() and int(length) <= limit


async def _pass(client: httpx.AsyncClient, request: Request) -> Response:
    """The request to the inference process's app, and its answer streamed back (server-sent events too)."""
    headers = [(k, v) for k, v in request.headers.raw if k.lower() not in HOP_BY_HOP]
    headers.append((FRONT_HEADER.encode(), b"1"))
    raw = request.scope.get("raw_path") or request.url.path.encode()  # as sent: still percent-encoded
    url = httpx.URL(raw_path=raw + (b"?" + request.scope["query_string"] if request.scope.get("query_string") else b""))
    content = request.stream() if _has_body(request) else b""  # streamed: never whole in this process
    try:
        answer = await client.send(
            client.build_request(request.method, url, headers=headers, content=content), stream=True
        )
    except ClientDisconnect:  # the client went away, or BodyLimit cut its body off (and answers 413)
        return Response(status_code=400)
    except httpx.TransportError as e:
        raise Unavailable(f"the inference process is not answering (restarting?): {type(e).__name__}") from e
    response = StreamingResponse(
        answer.aiter_raw(), status_code=answer.status_code, background=BackgroundTask(answer.aclose)
    )
    response.raw_headers = [(k.lower(), v) for k, v in answer.headers.raw if k.lower() not in HOP_BY_HOP]
    return response


def _workers_class():
    from uvicorn.supervisors import Multiprocess

    class Workers(Multiprocess):
        """uvicorn's worker processes, whose parent lets go of the listening socket when they are
        stopped: no connection waits in its backlog for workers that no longer take any."""

        def terminate_all(self) -> None:
            for sock in self.sockets:
                sock.close()
            super().terminate_all()

    return Workers


def run_workers(
    host: str,
    port: int,
    workers: int,
    access_log: bool = False,
    log_level: str = "info",
    stop: threading.Event | None = None,
) -> None:
    """``workers`` HTTP worker processes on one port (in this process when 1); returns when stopped:
    by SIGTERM (each worker drains, for at most ``drain_s``) or when ``stop`` is set."""
    import uvicorn

    config = uvicorn.Config(
        "service.serve.front:create_front_app",
        factory=True,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        workers=workers if workers > 1 else None,
        http=EdgeProtocol,
        timeout_graceful_shutdown=Settings().drain_s,
    )
    server = uvicorn.Server(config)
    if workers > 1:
        runner = _workers_class()(config, sockets=[config.bind_socket()])
        halt: Callable[[], None] = runner.should_exit.set
    else:
        runner, halt = server, lambda: setattr(server, "should_exit", True)
    if stop is not None:
        threading.Thread(target=lambda: stop.wait() and halt(), name="zoo-front-stop", daemon=True).start()
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C (raised again by uvicorn once it stopped)
        runner.run()


if __name__ == "__main__":  # by hand or from tests, with ZOO_IPC_DIR set: python -m service.serve.front PORT WORKERS
    run_workers("127.0.0.1", int(sys.argv[1]), int(sys.argv[2]), log_level="warning")
