"""Faults below the service, without a server: a database that cannot be reached (a port nothing
listens on), a disk that is full (writes to /dev/full, SQLite's page limit), Redis away (a closed
port): each is the one ZooError it is (503 with Retry-After, 507), logged once per outage, with no
server detail in what a client would read; the caches answer what they knew while their source is
down, for as long as they may."""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import tempfile
import time
from pathlib import Path

import pytest
from sqlalchemy import text

import service.common.ttl as ttl
from bench.scale import free_port
from service.api.auth import Auth
from service.api.quotas import MemoryBuckets, RedisBuckets
from service.common.ttl import TtlCache
from zoo_store.core.errors import InsufficientStorage, Unauthorized, Unavailable
from zoo_store.store.blobs import DirBlobStore
from zoo_store.store.db import Database, driver_problem
from zoo_store.store.tenancy import Keys


def _closed_url() -> str:
    return f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/postgres"  # nothing listens there


def test_an_unreachable_database_is_503_with_retry_after_logged_once(caplog) -> None:
    url = _closed_url()
    db = Database(url)
    port = url.split(":")[-1].split("/")[0]
    with caplog.at_level(logging.WARNING, "zoo.db"):
        for _ in range(20):
            with pytest.raises(Unavailable) as e, db.session() as s:
                s.execute(text("SELECT 1"))
            assert e.value.status == 503 and e.value.headers() == {"Retry-After": "2"}
            assert port not in e.value.detail and "127.0.0.1" not in e.value.detail and "psycopg" not in e.value.detail
    lines = [r for r in caplog.records if r.name == "zoo.db"]
    assert len(lines) == 1 and port in lines[0].getMessage() and not lines[0].exc_info  # driver text: logged once
    assert db.unreachable.down and not db.ping()
    db.dispose()


def test_which_driver_errors_are_which() -> None:
    full = driver_problem(sqlite3.OperationalError("database or disk is full"))
    assert isinstance(full, InsufficientStorage) and full.status == 507
    assert driver_problem(sqlite3.OperationalError("no such table: x")) is None  # a bug stays a bug (500)
    assert driver_problem(sqlite3.IntegrityError("UNIQUE constraint failed")) is None
    assert driver_problem(sqlite3.InterfaceError("misuse")) is None
    assert isinstance(driver_problem(sqlite3.OperationalError("anything"), is_disconnect=True), Unavailable)
    from psycopg import errors as pg

    assert isinstance(driver_problem(pg.DiskFull("could not extend file")), InsufficientStorage)
    for away in (pg.AdminShutdown, pg.CannotConnectNow, pg.TooManyConnections, pg.ConnectionFailure, pg.InterfaceError):
        assert isinstance(driver_problem(away("x")), Unavailable), away
    assert driver_problem(pg.UniqueViolation("x")) is None and driver_problem(pg.UndefinedTable("x")) is None


def test_sqlite_full_is_507(tmp_path: Path) -> None:
    """SQLite's own "database or disk is full": the file may not grow past its pages (max_page_count)."""
    db = Database(f"sqlite:///{tmp_path / 'zoo.db'}")
    db.migrate()
    with db.engine.connect() as c:
        c.execute(text("CREATE TABLE filler (x BLOB)"))
        pages = c.scalar(text("PRAGMA page_count"))
        c.execute(text(f"PRAGMA max_page_count = {pages}"))
        with pytest.raises(InsufficientStorage):
            c.execute(text("INSERT INTO filler VALUES (zeroblob(1000000))"))
    db.dispose()


def _full_disk(monkeypatch, made: list[str]) -> None:
    """Blob writes land on /dev/full (ENOSPC from the write itself); the temporary file is made as usual."""
    real = tempfile.mkstemp

    def mkstemp(**kw):
        fd, name = real(**kw)
        made.append(name)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), name

    monkeypatch.setattr("zoo_store.core.keystore.tempfile.mkstemp", mkstemp)


def test_a_blob_write_on_a_full_disk_is_507_and_leaves_no_file(tmp_path: Path, monkeypatch) -> None:
    blobs = DirBlobStore(tmp_path / "blobs")
    kept = blobs.put(b"before")
    made: list[str] = []
    _full_disk(monkeypatch, made)
    with pytest.raises(InsufficientStorage) as e:
        blobs.put(b"x" * 100_000)
    assert e.value.status == 507 and isinstance(e.value.__cause__, OSError) and e.value.__cause__.errno == errno.ENOSPC
    assert str(tmp_path) not in e.value.detail
    assert made and not any(Path(m).exists() for m in made)  # the temporary file is gone
    assert sorted(p.name for p in (tmp_path / "blobs").rglob("*") if p.is_file()) == [kept]


def test_a_stale_entry_is_served_while_its_source_is_down_within_the_bound(monkeypatch) -> None:
    cache, calls = TtlCache(0.05), []
    monkeypatch.setattr(ttl, "RETRY_S", 0.2)

    def down() -> str:
        calls.append(1)
        raise Unavailable("down")

    assert cache.get_or("k", lambda: "v", stale_s=0.6, stale_on=(Unavailable,)) == "v"
    time.sleep(0.1)  # past the ttl
    assert cache.get_or("k", down, stale_s=0.6, stale_on=(Unavailable,)) == "v" and len(calls) == 1
    assert cache.get_or("k", down, stale_s=0.6, stale_on=(Unavailable,)) == "v" and len(calls) == 1  # not asked again
    time.sleep(0.25)  # past RETRY_S: asked again
    assert cache.get_or("k", down, stale_s=0.6, stale_on=(Unavailable,)) == "v" and len(calls) == 2
    with pytest.raises(Unavailable):  # no entry: nothing to serve
        cache.get_or("other", down, stale_s=0.6, stale_on=(Unavailable,))
    with pytest.raises(Unavailable):  # without stale_s: as before
        cache.get_or("k", down)
    time.sleep(0.4)  # past the stale bound
    with pytest.raises(Unavailable):
        cache.get_or("k", down, stale_s=0.6, stale_on=(Unavailable,))
    with pytest.raises(KeyError):  # another error is never answered stale
        cache.get_or("k", lambda: {}["x"], stale_s=60, stale_on=(Unavailable,))


def test_a_known_key_is_taken_while_the_database_is_down_and_a_revocation_counts_once_it_is_back(tmp_path, monkeypatch):
    db = Database(f"sqlite:///{tmp_path / 'zoo.db'}")
    db.migrate()
    row, key = Keys(db).create("a")
    auth = Auth(db, enabled=True, stale_s=60)
    auth._seen.ttl = 0.1
    monkeypatch.setattr(ttl, "RETRY_S", 0.1)
    assert auth.caller(key).tenant == "a"
    found = auth.keys.find

    def down(k: str):
        raise Unavailable("the database is unreachable for a moment; retry shortly", retry_after=2)

    monkeypatch.setattr(auth.keys, "find", down)
    time.sleep(0.2)
    assert auth.caller(key).tenant == "a"  # stale, within the bound
    _, unseen = Keys(db).create("b")
    with pytest.raises(Unavailable):  # never seen: 503, not 401
        auth.caller(unseen)
    Keys(db).revoke(row.id)  # as another replica would, while this one cannot read it
    monkeypatch.setattr(auth.keys, "find", found)  # back
    time.sleep(0.25)  # the ttl and RETRY_S
    with pytest.raises(Unauthorized):
        auth.caller(key)
    db.dispose()


def test_the_rate_limiter_falls_back_to_this_process_while_redis_is_down(caplog) -> None:
    buckets = RedisBuckets(f"redis://127.0.0.1:{free_port()}/0", prefix="zoo:test:")
    local = MemoryBuckets()
    with caplog.at_level(logging.WARNING, "zoo.quotas"):
        taken = [buckets.take("t", rate=1.0, burst=3) for _ in range(5)]
        assert [w == 0 for w in taken] == [local.take("t", rate=1.0, burst=3) == 0 for _ in range(5)]  # as in memory
        assert buckets.unreachable() == "unreachable"
    assert len([r for r in caplog.records if r.name == "zoo.quotas"]) == 1
