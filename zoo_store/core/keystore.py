"""Content addresses, and the small key-value edge for derived data that may be dropped at any time
(similarity matrices a later job may reuse): one interface, a directory and an in-memory twin."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Protocol


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
        path = self._path(key)
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)


class MemoryKeyStore:
    def __init__(self) -> None:
        self.items: dict[str, bytes] = {}

    def get(self, key: str) -> bytes | None:
        return self.items.get(key)

    def put(self, key: str, data: bytes) -> None:
        self.items[key] = bytes(data)
