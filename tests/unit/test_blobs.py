"""The blob store edge: a directory, chunked rows in SQLite and PostgreSQL, and the in-memory twin
keep the same contract (content addressed, all or nothing, verified on read); the migrations give
exactly the tables the models declare."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import update

from zoo_store.core.errors import IntegrityError, NotFound
from zoo_store.core.keystore import sha256
from zoo_store.store.blobs import BlobStore, DbBlobStore, DirBlobStore, MemoryBlobStore
from zoo_store.store.db import Base, BlobChunkRow, Database


@pytest.fixture(params=["dir", "memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def blobs(request, tmp_path: Path) -> Iterator[BlobStore]:
    if request.param == "dir":
        yield DirBlobStore(tmp_path / "blobs")
    elif request.param == "memory":
        yield MemoryBlobStore()
    else:
        url = (
            f"sqlite:///{tmp_path / 'zoo.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url_fresh")
        )
        db = Database(url)
        db.migrate()
        yield DbBlobStore(db, chunk_bytes=1000)  # small chunks: the tests' blobs span several
        db.dispose()


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 2501])
def test_round_trip(blobs: BlobStore, size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    digest = blobs.put(data)
    assert digest == sha256(data) and blobs.has(digest)
    assert blobs.get(digest) == data
    assert blobs.put(data) == digest  # idempotent


def test_absent_and_malformed(blobs: BlobStore) -> None:
    assert not blobs.has("0" * 64)
    for digest in ("0" * 64, "../etc/passwd", "A" * 64):
        with pytest.raises(NotFound):
            blobs.get(digest)


def test_same_blob_from_many_writers(blobs: BlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writers that all found the blob absent store it at once: each gets its digest, one blob stays."""
    data = b"w" * 5000
    absent_for_all = threading.Barrier(4)
    has, asked = blobs.has, threading.local()

    def race(digest: str) -> bool:  # each writer's first look: absent, and all look before any writes
        if getattr(asked, "once", False):
            return has(digest)
        asked.once = True
        absent_for_all.wait(timeout=10)
        return False

    monkeypatch.setattr(blobs, "has", race)
    with ThreadPoolExecutor(4) as pool:
        assert set(pool.map(lambda _: blobs.put(data), range(4))) == {sha256(data)}
    monkeypatch.setattr(blobs, "has", has)
    assert blobs.get(sha256(data)) == data


def test_directory_blob_verified_on_read(tmp_path: Path) -> None:
    blobs = DirBlobStore(tmp_path)
    digest = blobs.put(b"weights")
    (tmp_path / digest[:2] / digest).write_bytes(b"tampered")
    with pytest.raises(IntegrityError, match="does not match"):
        blobs.get(digest)


def test_database_blob_verified_on_read(db_url: str) -> None:
    db = Database(db_url)
    db.migrate()
    blobs = DbBlobStore(db, chunk_bytes=4)
    digest = blobs.put(b"weights!")
    with db.session() as s:
        s.execute(update(BlobChunkRow).where(BlobChunkRow.digest == digest, BlobChunkRow.seq == 1).values(data=b"evil"))
    with pytest.raises(IntegrityError, match="does not match"):
        blobs.get(digest)
    db.dispose()


def test_migrations_match_the_models(db_url: str) -> None:
    db = Database(db_url)
    db.migrate()
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    db.dispose()
    assert diff == []
