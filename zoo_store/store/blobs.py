"""Content-addressed blob store: one interface, a directory (embedded default), chunked rows in the
database (distributed mode: nothing on a shared disk) and an in-memory twin."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError as SAIntegrityError

from zoo_store.core.errors import IntegrityError, NotFound
from zoo_store.core.keystore import atomic_write, sha256
from zoo_store.store.db import BlobChunkRow, Database


class BlobStore(Protocol):
    def put(self, data: bytes) -> str: ...  # returns the SHA-256 digest
    def get(self, digest: str) -> bytes: ...  # verified against the digest
    def has(self, digest: str) -> bool: ...


class DirBlobStore:
    """Files named by digest under ``root/ab/abcdef...``; written atomically, verified on read."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, digest: str) -> Path:
        _check_digest(digest)
        return self.root / digest[:2] / digest

    def put(self, data: bytes) -> str:
        digest = sha256(data)
        path = self._path(digest)
        if path.exists():
            return digest
        atomic_write(path, data, f"a blob of {len(data):,} bytes")
        return digest

    def get(self, digest: str) -> bytes:
        path = self._path(digest)
        if not path.exists():
            raise NotFound(f"no blob {digest}")
        data = path.read_bytes()
        if sha256(data) != digest:
            raise IntegrityError(f"blob {digest} does not match its digest (changed on disk?)")
        return data

    def has(self, digest: str) -> bool:
        return self._path(digest).exists()


def _check_digest(digest: str) -> None:
    if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
        raise NotFound(f"no blob {digest!r}")


class DbBlobStore:
    """Blobs as rows of ``blob_chunks`` (digest, seq, data) in the database every process shares,
    written in one transaction (a blob is all there or absent), verified on read."""

    def __init__(self, db: Database, chunk_bytes: int = 8 * 2**20):
        self.db, self.chunk_bytes = db, chunk_bytes

    def put(self, data: bytes) -> str:
        digest = sha256(data)
        if self.has(digest):
            return digest
        view = memoryview(data)
        try:
            with self.db.session() as s:  # one transaction, one INSERT per chunk (never the whole blob in one)
                for seq, at in enumerate(range(0, max(len(data), 1), self.chunk_bytes)):
                    s.add(BlobChunkRow(digest=digest, seq=seq, data=bytes(view[at : at + self.chunk_bytes])))
                    s.flush()
                    s.expunge_all()
        except SAIntegrityError:  # the same bytes stored at the same moment by another process
            if not self.has(digest):
                raise
        return digest

    def get(self, digest: str) -> bytes:
        _check_digest(digest)
        with self.db.session() as s:
            chunks = list(
                s.scalars(select(BlobChunkRow.data).where(BlobChunkRow.digest == digest).order_by(BlobChunkRow.seq))
            )
        if not chunks:
            raise NotFound(f"no blob {digest}")
        data = b"".join(chunks)
        if sha256(data) != digest:
            raise IntegrityError(f"blob {digest} does not match its digest (changed in the database?)")
        return data

    def has(self, digest: str) -> bool:
        _check_digest(digest)
        with self.db.session() as s:
            return (
                s.scalar(select(BlobChunkRow.seq).where(BlobChunkRow.digest == digest, BlobChunkRow.seq == 0))
                is not None
            )


class MemoryBlobStore:
    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def put(self, data: bytes) -> str:
        digest = sha256(data)
        self.blobs[digest] = bytes(data)
        return digest

    def get(self, digest: str) -> bytes:
        if digest not in self.blobs:
            raise NotFound(f"no blob {digest}")
        data = self.blobs[digest]
        if sha256(data) != digest:
            raise IntegrityError(f"blob {digest} does not match its digest")
        return data

    def has(self, digest: str) -> bool:
        return digest in self.blobs
