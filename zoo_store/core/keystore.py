"""Content addresses, and the small key-value edge for derived data that may be dropped at any time
(similarity matrices a later job may reuse): one interface, a directory and an in-memory twin."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Protocol

from zoo_store.core.errors import storage_full


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write(path: Path, data: bytes, what: str) -> None:
    """``data`` at ``path`` all at once (a temporary file beside it, then renamed): never a partial
    file, and no temporary one left on any failure. A full disk is ``InsufficientStorage`` naming ``what``."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".put-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if (full := storage_full(e, what)) is not None:
            raise full from e
        raise


class KeyStore(Protocol):
    """Bytes by name, for caches that may be dropped at any time (never for anything a path needs)."""

    def get(self, key: str) -> bytes | None: ...
    def put(self, key: str, data: bytes) -> None: ...


class DirKeyStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        if not key or not all(c in "abcdefghijklmnopqrstuvwxyz0123456789-_." for c in key) or key.startswith("."):
            raise ValueError(f"bad cache key {key!r}")
        return self.root / key

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        return path.read_bytes() if path.exists() else None

    def put(self, key: str, data: bytes) -> None:
        atomic_write(self._path(key), data, f"cached data {key!r}")


class MemoryKeyStore:
    def __init__(self) -> None:
        self.items: dict[str, bytes] = {}

    def get(self, key: str) -> bytes | None:
        return self.items.get(key)

    def put(self, key: str, data: bytes) -> None:
        self.items[key] = bytes(data)
