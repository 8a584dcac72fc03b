"""SQLAlchemy 2.0 models and the Database handle (SQLite by default, PostgreSQL in production)."""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Integer,
    LargeBinary,
    String,
    Text,
    create_engine,
    event,
    select,
    text,
)
from sqlalchemy.engine import Engine, ExceptionContext
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from zoo_store.core.errors import DatabaseUnreachable, InsufficientStorage, ZooError
from zoo_store.core.outage import Outage

log = logging.getLogger("zoo.db")


def _migrations_dir() -> Path:
    """``migrations/`` at the repository's top, shipped inside the wheel as ``zoo_store.migrations``
    (an install, editable or not, resolves it); a checkout used without installing it falls back to
    the folder beside ``zoo_store/``."""
    try:
        return Path(str(files("zoo_store.migrations")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "migrations"


MIGRATIONS_DIR = _migrations_dir()


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_id(prefix: str) -> str:
    """Time-ordered ids: listing by id lists by creation time."""
    return f"{prefix}_{time.time_ns():020x}{secrets.token_hex(4)}"


class Base(DeclarativeBase):
    type_annotation_map: ClassVar = {dict[str, Any]: JSON, list[Any]: JSON}


class BaseRow(Base):
    __tablename__ = "bases"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    digest: Mapped[str] = mapped_column(String(64))
    arch: Mapped[str] = mapped_column(String(64))
    card: Mapped[dict[str, Any]]
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DatasetRow(Base):
    __tablename__ = "datasets"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(String(16))  # builtin | upload
    blob_digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    labels: Mapped[list[Any]]
    num_samples: Mapped[int] = mapped_column(Integer)
    shape: Mapped[list[Any]]  # [C, H, W]
    splits: Mapped[dict[str, Any]]  # {"train": n, "val": n, "test": n}
    tenant: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)  # None: built in, everyone's
    bytes: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the stored upload's (None: built in)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JobRow(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    method: Mapped[str] = mapped_column(String(32))
    spec: Mapped[dict[str, Any]]
    state: Mapped[str] = mapped_column(String(16), index=True)
    progress: Mapped[dict[str, Any]]
    metrics: Mapped[dict[str, Any]]
    path_id: Mapped[str | None] = mapped_column(String(80), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    tenant: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)  # whose job it is
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class PathRow(Base):
    __tablename__ = "paths"
    id: Mapped[str] = mapped_column(String(80), primary_key=True)
    method: Mapped[str] = mapped_column(String(32))
    manifest: Mapped[dict[str, Any]]
    bundle: Mapped[bytes] = mapped_column(LargeBinary)  # the .zoopath bytes (safetensors)
    bytes: Mapped[int] = mapped_column(Integer)
    dense_bytes: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]]
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class PathOwnerRow(Base):
    """A tenant that owns a path: it composed or imported it (one stored path, one row per owner)."""

    __tablename__ = "path_owners"
    path_id: Mapped[str] = mapped_column(String(80), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)


class PathGrantRow(Base):
    """An owner lets another tenant (``*``: every tenant) read and predict a path. Each owner's
    grants are its own: another owner can neither change them nor see them."""

    __tablename__ = "path_grants"
    path_id: Mapped[str] = mapped_column(String(80), primary_key=True)
    grantor: Mapped[str] = mapped_column(String(64), primary_key=True)
    grantee: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)


class TenantLimitsRow(Base):
    """A tenant's limits where they differ from the Settings' defaults (only the ones that do)."""

    __tablename__ = "tenant_limits"
    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    limits: Mapped[dict[str, Any]]


class AuditRow(Base):
    """One mutating call: who (key and tenant), what (method, route, target id), and its status."""

    __tablename__ = "audit"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # time-ordered
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    key_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    tenant: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    method: Mapped[str] = mapped_column(String(8))
    route: Mapped[str] = mapped_column(String(200))
    target: Mapped[str | None] = mapped_column(String(200), nullable=True)
    status: Mapped[int] = mapped_column(Integer)


class ApiKeyRow(Base):
    """An API key: only its SHA-256 is kept, found by the short prefix it starts with."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    hash: Mapped[str] = mapped_column(String(64))
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class BlobChunkRow(Base):
    """The database blob store: a blob's bytes in order of ``seq`` (distributed mode)."""

    __tablename__ = "blob_chunks"
    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class PathDeletionRow(Base):
    """Deleted path ids in order: replicas follow it to drop the path from their caches."""

    __tablename__ = "path_deletions"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    path_id: Mapped[str] = mapped_column(String(80))


def _sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=10000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA mmap_size=1073741824")  # read bundles (many overflow pages) from the page cache directly
        cur.close()


DB_RETRY_AFTER_S = 2  # what a 503 for an unreachable database tells clients
# PostgreSQL's SQLSTATEs of a server that is away for a while: too many connections, shutting down
# (admin, crash), starting up; class 08: the connection itself
_PG_AWAY = {"53300", "57P01", "57P02", "57P03"}
_PG_DISK_FULL = "53100"


def driver_problem(e: BaseException, is_disconnect: bool = False, connecting: bool = False) -> ZooError | None:
    """What a driver's exception is to a client, when it is a known condition rather than a bug: the
    database's disk full (507), the database unreachable (503 with Retry-After); None otherwise.
    The message says nothing of the server (no host, port or driver text): the log has that."""
    state = getattr(e, "sqlstate", None) or ""
    if state == _PG_DISK_FULL or (
        isinstance(e, sqlite3.OperationalError)
        and (getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "database or disk is full" in str(e))
    ):
        return InsufficientStorage("the server's storage is full: nothing was stored; try again once space is freed")
    name = type(e).__name__  # the DB-API's classes, whatever the driver: a server's InterfaceError is a lost connection
    if (
        is_disconnect
        or state in _PG_AWAY
        or state.startswith("08")
        or (connecting and name == "OperationalError")
        or (name == "InterfaceError" and not isinstance(e, sqlite3.Error))
    ):
        return DatabaseUnreachable(
            "the database is unreachable for a moment; retry shortly", retry_after=DB_RETRY_AFTER_S
        )
    return None


MIGRATION_LOCK_KEY = 0x5A00_0001  # one migrating process at a time
DEMO_ZOO_LOCK_KEY = 0x5A00_0002  # one process training the demo zoo at a time


class Database:
    def __init__(self, url: str):
        self.url = url
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # a pooled connection to a server may have gone stale; a SQLite file's cannot (and a ping costs a query)
        # hide_parameters: a failed statement's message never carries its values (a key's hash, say)
        self.engine = create_engine(url, pool_pre_ping=not url.startswith("sqlite"), hide_parameters=True)
        if self.engine.dialect.name == "sqlite":
            _sqlite_pragmas(self.engine)
        self.unreachable = Outage("database unreachable", log)  # logged once per outage, not per request
        self.full = Outage("database storage full", log)
        event.listen(self.engine, "handle_error", self._on_error)
        event.listen(self.engine, "connect", lambda *_: self.unreachable.recovered())  # a new connection: it is back
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def _on_error(self, ctx: ExceptionContext) -> ZooError | None:
        """Every driver error, in one place: a known condition becomes the ZooError it is (raised in
        place of SQLAlchemy's; the pool still invalidates a lost connection), anything else is left as is."""
        if ctx.is_pre_ping:  # the pool's check of an idle connection: a lost one is replaced quietly
            return None
        e = ctx.original_exception
        found = driver_problem(e, ctx.is_disconnect, connecting=ctx.connection is None)
        if found is not None:
            outage = self.full if found.status == 507 else self.unreachable
            outage.failed(f"{type(e).__name__}: {' '.join(str(e).split())}")
        return found

    def migrate(self) -> None:
        """``alembic upgrade head`` against this database."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.attributes["connection_url"] = self.url
        with self.exclusive(MIGRATION_LOCK_KEY), self.engine.begin() as conn:  # processes starting together take turns
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    @contextmanager
    def exclusive(self, key: int) -> Iterator[None]:
        """One process at a time, across every process on this database: a PostgreSQL advisory lock
        held on a connection of its own, or a file lock beside a SQLite file."""
        if self.engine.dialect.name == "sqlite":
            with open(f"{self.engine.url.database or 'memory'}.{key:x}.lock", "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)
            return
        with self.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
            conn.commit()
            try:
                yield
            finally:
                try:
                    conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                    conn.commit()
                except Exception:  # noqa: BLE001 (a broken connection must not go back to the pool holding the lock)
                    conn.invalidate()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed on success, rolled back on any error."""
        with self._sessions.begin() as s:
            yield s

    def ping(self) -> bool:
        try:
            with self.engine.connect() as c:
                c.execute(select(1))
            return True
        except Exception:  # noqa: BLE001
            return False

    def dispose(self) -> None:
        self.engine.dispose()


def page(
    s: Session, row_type: type[Base], cursor: str | None, limit: int, where: tuple = (), **filters: Any
) -> tuple[list, str | None]:
    """Keyset pagination by id: returns the rows after ``cursor`` (that match ``where`` and the
    equality ``filters`` whose value is not None) and the next cursor."""
    q = select(row_type).where(*where).order_by(row_type.id).limit(limit + 1)  # type: ignore[attr-defined]
    if cursor:
        q = q.where(row_type.id > cursor)  # type: ignore[attr-defined]
    for k, v in filters.items():
        if v is not None:
            q = q.where(getattr(row_type, k) == v)
    rows = list(s.scalars(q))
    nxt = rows[limit - 1].id if len(rows) > limit else None
    return rows[:limit], nxt
