"""The device channel: HTTP worker processes hand decoded tensors to the one inference process
that owns the device, and get scores back.

Frames on a Unix stream socket: a 4-byte big-endian header length, the header (JSON), then
``header["payload"]`` bytes. A request's tensor travels through a shared-memory arena that its
worker owns (one slot per request in flight) when it fits a slot, inline in the frame otherwise;
the scores come back inline (they are small). Nothing on this channel is pickled.

Ops: ``hello`` (a worker names its arena), ``describe`` (a path's input spec and labels) and
``predict`` (with ``"describe": true``, a worker's first predict of a path: the tensor's C, H and
W are checked there and the answer carries the description too). An error comes back as ``{"error": {"kind", "detail", "retry_after"}}`` and is
raised again on the worker's side as the same ``ZooError``, so it maps to the same HTTP answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import struct
import time
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
import torch
from starlette.concurrency import run_in_threadpool

from service.api.inputs import check_npy_shape
from zoo_store.core import errors
from zoo_store.core.errors import Unavailable, ZooError
from zoo_store.core.manifest import Manifest

if TYPE_CHECKING:
    from service.api.state import Services

log = logging.getLogger("zoo.channel")
HEADER = struct.Struct(">I")
ERRORS: dict[str, type[ZooError]] = {
    c.__name__: c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, ZooError)
}


def frame(header: dict[str, Any], payload: bytes | memoryview = b"") -> bytes:
    head = orjson.dumps({**header, "payload": len(payload)})
    return HEADER.pack(len(head)) + head + bytes(payload)


async def read_frame(reader: asyncio.StreamReader) -> tuple[dict[str, Any], bytes]:
    (n,) = HEADER.unpack(await reader.readexactly(HEADER.size))
    header = orjson.loads(await reader.readexactly(n))
    payload = await reader.readexactly(header["payload"]) if header["payload"] else b""
    return header, payload


def error_header(e: ZooError) -> dict[str, Any]:
    return {"error": {"kind": type(e).__name__, "detail": e.detail, "retry_after": e.retry_after}}


def raise_error(info: dict[str, Any]) -> None:
    raise ERRORS.get(info["kind"], ZooError)(info["detail"], retry_after=info.get("retry_after"))


# -- the worker's side --------------------------------------------------------------------------


class Arena:
    """A worker's shared memory for request tensors: fixed slots, one per request in flight."""

    def __init__(self, slot_bytes: int, slots: int):
        self.slot_bytes = slot_bytes
        self.shm = shared_memory.SharedMemory(create=True, size=slot_bytes * slots)
        self.free = list(range(slots - 1, -1, -1))

    def put(self, x: np.ndarray) -> int | None:
        """Copy ``x`` into a free slot; None when it does not fit or none is free."""
        if x.nbytes > self.slot_bytes or not self.free:
            return None
        slot = self.free.pop()
        np.ndarray(x.shape, x.dtype, buffer=self.shm.buf, offset=slot * self.slot_bytes)[...] = x
        return slot

    def release(self, slot: int) -> None:
        self.free.append(slot)

    def close(self) -> None:
        self.shm.close()
        with contextlib.suppress(FileNotFoundError):
            self.shm.unlink()


class DeviceClient:
    """One multiplexed connection from a worker to the inference process; reconnects when asked
    after the inference process restarted. Every failure to reach it is a 503."""

    def __init__(self, socket_path: Path, arena: Arena):
        self.socket_path, self.arena = socket_path, arena
        self._writer: asyncio.StreamWriter | None = None
        self._waiting: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()
        self._connecting: asyncio.Lock | None = None

    async def _connection(self) -> asyncio.StreamWriter:
        if self._writer is not None and not self._writer.is_closing():
            return self._writer
        self._connecting = self._connecting or asyncio.Lock()
        async with self._connecting:
            if self._writer is not None and not self._writer.is_closing():
                return self._writer
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
            except (FileNotFoundError, ConnectionRefusedError, OSError) as e:
                raise Unavailable(f"the inference process is not running (restarting?): {e}") from e
            writer.write(frame({"op": "hello", "id": -1, "arena": self.arena.shm.name, "slot_bytes": self.arena.slot_bytes}))
            self._writer = writer
            asyncio.get_running_loop().create_task(self._read(reader, writer))
            return writer

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header, payload = await read_frame(reader)
                fut = self._waiting.pop(header["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result((header, payload))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            writer.close()
            if self._writer is writer:
                self._writer = None
            lost, self._waiting = self._waiting, {}
            for fut in lost.values():
                if not fut.done():
                    fut.set_exception(Unavailable("the inference process went away while answering; retry"))

    async def call(self, header: dict[str, Any], payload: bytes = b"") -> tuple[dict[str, Any], bytes]:
        writer = await self._connection()
        request_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = fut
        writer.write(frame({**header, "id": request_id}, payload))
        answer, data = await fut
        if "error" in answer:
            raise_error(answer["error"])
        return answer, data

    async def describe(self, path_id: str, key: str | None) -> dict[str, Any]:
        answer, _ = await self.call({"op": "describe", "path": path_id, "key": key})
        return answer["path"]

    async def predict(self, path_id: str, x: np.ndarray, key: str | None) -> torch.Tensor:
        """x: (N, C, H, W) float32 -> probabilities (N, K) float32, for the bearer of ``key``."""
        return (await self._predict(path_id, x, key, describe=False))[0]

    async def predict_described(self, path_id: str, x: np.ndarray, key: str | None) -> tuple[torch.Tensor, dict[str, Any]]:
        """A worker's first predict of a path, in one round trip: x (N, C, H, W) is checked against
        the path's input there -> (probabilities (N, K), what ``describe`` answers)."""
        return await self._predict(path_id, x, key, describe=True)

    async def _predict(self, path_id: str, x: np.ndarray, key: str | None, describe: bool) -> tuple[torch.Tensor, Any]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        slot = self.arena.put(x)
        header = {"op": "predict", "path": path_id, "shape": list(x.shape), "slot": slot, "key": key, "describe": describe}
        try:
            answer, data = await self.call(header, b"" if slot is not None else x.tobytes())
        finally:
            if slot is not None:
                self.arena.release(slot)
        return torch.frombuffer(bytearray(data), dtype=torch.float32).view(answer["shape"]), answer.get("path")


# -- the inference process's side ---------------------------------------------------------------


class DeviceServer:
    """Serves the channel inside the inference process, on the app's event loop."""

    def __init__(self, svc: Services, socket_path: Path):
        self.svc, self.socket_path = svc, socket_path
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.socket_path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._connection, path=str(self.socket_path))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self.socket_path.unlink(missing_ok=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        arena: shared_memory.SharedMemory | None = None
        slot_bytes = 0
        tasks: set[asyncio.Task] = set()
        try:
            while True:
                header, payload = await read_frame(reader)
                if header["op"] == "hello":
                    arena, slot_bytes = _attach(header["arena"]), header["slot_bytes"]
                    continue
                task = asyncio.get_running_loop().create_task(self._answer(header, payload, arena, slot_bytes, writer))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError, OSError, asyncio.CancelledError):
            pass  # the worker went away, or this process is stopping
        finally:
            for task in tasks:
                task.cancel()
            writer.close()
            if arena is not None:
                with contextlib.suppress(BufferError):
                    arena.close()

    async def _answer(self, header: dict, payload: bytes, arena, slot_bytes: int, writer: asyncio.StreamWriter) -> None:
        try:
            answer, data = await self._op(header, payload, arena, slot_bytes)
        except ZooError as e:
            answer, data = error_header(e), b""
        except Exception as e:
            log.exception("channel op %s failed", header.get("op"))
            answer, data = error_header(ZooError(f"{type(e).__name__}: {e}")), b""
        if not writer.is_closing():
            writer.write(frame({**answer, "id": header["id"]}, data))

    async def _op(self, header: dict, payload: bytes, arena, slot_bytes: int) -> tuple[dict, bytes]:
        import torch
        svc = self.svc
        if not svc.ready.is_set():
            raise Unavailable(svc.startup_error or "the zoo is still loading; see /readyz")
        path_id, arrived = header["path"], time.monotonic()
        # the request's bearer key, checked here (off the event loop: it may ask the database, or Redis)
        if header["op"] == "describe":  # not a use of the path: the predict that follows is
            return {"path": described(await run_in_threadpool(svc.describe, header.get("key"), path_id))}, b""
        entry = await run_in_threadpool(svc.keyed_entry, header.get("key"), path_id)
        shape = tuple(header["shape"])  # (N, C, H, W)
        if header.get("describe"):  # the worker has not seen the path: it could not check the shape
            check_npy_shape(shape, entry.manifest.input)
        if header["slot"] is not None and arena is not None:
            start = header["slot"] * slot_bytes
            x = torch.frombuffer(arena.buf, dtype=torch.float32, count=int(np.prod(shape)), offset=start).view(shape)
        else:
            x = torch.frombuffer(bytearray(payload), dtype=torch.float32).view(shape)
        probs = await svc.batcher.submit(entry, x, arrived)  # (N, K): the worker's slot is read before this returns
        answer = {"shape": list(probs.shape)}
        if header.get("describe"):
            answer["path"] = described(entry.manifest)
        return answer, probs.numpy().tobytes()


def described(m: Manifest) -> dict[str, Any]:
    """What a worker needs of a path to decode and answer its predicts."""
    return {"input": m.input.model_dump(mode="json"), "labels": list(m.labels)}


def _attach(name: str) -> shared_memory.SharedMemory:
    """Open a worker's arena without adopting it: the worker that made it unlinks it."""
    shm = shared_memory.SharedMemory(name=name)
    with contextlib.suppress(Exception):
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    return shm
