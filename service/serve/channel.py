"""The device channel: HTTP worker processes hand decoded tensors to the one inference process
that owns the device, and get scores back. Wire protocol only: what an op means is the handler's
(``service.api.device``), which the inference process gives ``DeviceServer``.

Frames on a Unix stream socket: a 4-byte big-endian header length, the header (JSON), then
``header["payload"]`` bytes. A request's tensor travels through a shared-memory arena that its
worker owns (one slot per request in flight, ``header["slot"]`` and ``header["nbytes"]``) when it
fits a slot, inline in the frame otherwise; the answer's bytes come back inline (scores: small).
Nothing on this channel is pickled.

Ops: ``hello`` (a worker names its arena; the server's own), ``caller`` (is a bearer key live: an
answer, or Unauthorized, before the request's body is read), ``describe`` (a path's input spec and
labels) and ``predict`` (with ``"describe": true``, a worker's first predict of a path: the tensor's
C, H and W are checked there, the error naming ``"form"``'s input, and the answer carries the
description too). An error comes back as ``{"error": {"kind", "detail", "retry_after"}}`` and is
raised again on the worker's side as the same ``ZooError``, so it maps to the same HTTP answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import struct
from collections.abc import Awaitable, Callable
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from zoo_store.core import errors
from zoo_store.core.errors import Unavailable, ZooError

log = logging.getLogger("zoo.channel")
HEADER = struct.Struct(">I")
ERRORS: dict[str, type[ZooError]] = {
    c.__name__: c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, ZooError)
}
# a request's header and its tensor's bytes (a view of the worker's arena slot, or the frame's
# payload: valid until the handler returns) -> the answer's header and bytes
Handler = Callable[[dict[str, Any], memoryview], Awaitable[tuple[dict[str, Any], bytes]]]


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
            writer.write(
                frame({"op": "hello", "id": -1, "arena": self.arena.shm.name, "slot_bytes": self.arena.slot_bytes})
            )
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

    async def caller(self, key: str | None) -> bool:
        """True when ``key`` may come in (the inference process checks it); Unauthorized otherwise."""
        await self.call({"op": "caller", "key": key})
        return True

    async def describe(self, path_id: str, key: str | None, base: bool = False) -> dict[str, Any]:
        """A path's (a base's when ``base``) input and labels, for the bearer of ``key``."""
        answer, _ = await self.call({"op": "describe", "path": path_id, "key": key, "base": base})
        return answer["path"]

    async def predict(self, path_id: str, x: np.ndarray, key: str | None, base: bool = False) -> np.ndarray:
        """x: (N, C, H, W) float32 -> probabilities (N, K) float32, for the bearer of ``key``; of the
        path ``path_id``, or of the base of that id when ``base``."""
        return (await self._predict(path_id, x, key, {"base": base}))[0]

    async def predict_described(
        self, path_id: str, x: np.ndarray, key: str | None, form: str = "npy", base: bool = False
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """A worker's first predict of a path, in one round trip: x (N, C, H, W) is checked against
        the path's input there (a mismatch is refused as ``form``'s input: "npy" or "oip")
        -> (probabilities (N, K), what ``describe`` answers)."""
        return await self._predict(path_id, x, key, {"describe": True, "form": form, "base": base})

    async def _predict(self, path_id: str, x: np.ndarray, key: str | None, more: dict) -> tuple[np.ndarray, Any]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        slot = self.arena.put(x)
        header = {
            "op": "predict",
            "path": path_id,
            "shape": list(x.shape),
            "slot": slot,
            "nbytes": x.nbytes,
            "key": key,
            **more,
        }
        try:
            answer, data = await self.call(header, b"" if slot is not None else x.tobytes())
        finally:
            if slot is not None:
                self.arena.release(slot)
        return np.frombuffer(data, dtype=np.float32).reshape(answer["shape"]), answer.get("path")


# -- the inference process's side ---------------------------------------------------------------


class DeviceServer:
    """Serves the channel inside the inference process, on the app's event loop: each request's
    header and tensor bytes go to ``handler``; its answer, or the ``ZooError`` it raised, goes back."""

    def __init__(self, handler: Handler, socket_path: Path):
        self.handler, self.socket_path = handler, socket_path
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
        tensor = memoryview(b"")
        try:
            tensor = _tensor_bytes(header, payload, arena, slot_bytes)
            answer, data = await self.handler(header, tensor)
        except ZooError as e:
            answer, data = error_header(e), b""
        except Exception:  # a bug: its text goes to the log, not into the worker's 500 body
            ref = secrets.token_hex(4)
            log.exception("channel op %s failed (ref %s)", header.get("op"), ref)
            answer, data = error_header(ZooError(f"an unexpected error (ref {ref}); the server's log has it")), b""
        finally:
            with contextlib.suppress(BufferError):
                tensor.release()  # no longer holds the arena: it closes when the worker goes away
        if not writer.is_closing():
            writer.write(frame({**answer, "id": header["id"]}, data))


def _tensor_bytes(
    header: dict, payload: bytes, arena: shared_memory.SharedMemory | None, slot_bytes: int
) -> memoryview:
    """The request's tensor: its bytes in the worker's arena slot, or the frame's payload."""
    slot = header.get("slot")
    if slot is None:
        return memoryview(payload)
    if arena is None or not 0 <= header["nbytes"] <= slot_bytes:
        raise ZooError(f"arena slot {slot} named without an arena that holds {header['nbytes']} bytes")
    return arena.buf[slot * slot_bytes : slot * slot_bytes + header["nbytes"]]


def _attach(name: str) -> shared_memory.SharedMemory:
    """Open a worker's arena without adopting it: the worker that made it unlinks it."""
    shm = shared_memory.SharedMemory(name=name)
    with contextlib.suppress(Exception):
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    return shm
