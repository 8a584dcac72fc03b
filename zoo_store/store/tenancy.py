"""Tenants and API keys: who is calling (a key names a tenant, and whether it is an admin's). Keys
are random, shown once and kept only as their SHA-256, found by the short prefix they start with."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import select

from zoo_store.core.errors import InvalidInput, NotFound
from zoo_store.store.db import ApiKeyRow, Database, new_id, page, utcnow

TENANT = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
RESERVED = ("admin", "local")  # the tenants of the first admin key and of every caller when auth is off
_KEY = re.compile(r"zoo_([0-9a-f]{12})_[A-Za-z0-9_-]{43}")


@dataclass(frozen=True)
class Caller:
    """Who a request comes from. An admin may use every tenant's jobs, paths and datasets."""

    tenant: str
    admin: bool
    key_id: str | None = None  # None: auth is off

    @property
    def visible_to(self) -> str | None:
        """The tenant whose things this caller sees, None for all of them."""
        return None if self.admin else self.tenant


def check_tenant(name: str) -> str:
    if not TENANT.fullmatch(name):
        raise InvalidInput(f"tenant {name!r}: 1 to 64 of a-z 0-9 _ . -, starting with a letter or digit")
    return name


def well_formed(key: str) -> bool:
    return _KEY.fullmatch(key) is not None


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Keys:
    def __init__(self, db: Database):
        self.db = db

    def create(self, tenant: str, admin: bool = False, expires_at: dt.datetime | None = None) -> tuple[ApiKeyRow, str]:
        """A new key for ``tenant``: its row and the key itself (shown once, never stored)."""
        check_tenant(tenant)
        if tenant in RESERVED and not admin:
            raise InvalidInput(f"tenant {tenant!r} is for admins' keys (the first admin key's, or ZOO_AUTH=off's)")
        if expires_at is not None and expires_at.astimezone(dt.UTC) <= utcnow():
            raise InvalidInput("expires_at is in the past")
        prefix = secrets.token_hex(6)
        key = f"zoo_{prefix}_{secrets.token_urlsafe(32)}"  # 32 random bytes after the prefix
        row = ApiKeyRow(
            id=new_id("key"),
            prefix=prefix,
            hash=_hash(key),
            tenant=tenant,
            admin=admin,
            created_at=utcnow(),
            expires_at=expires_at,
        )
        with self.db.session() as s:
            s.add(row)
        return row, key

    def find(self, key: str) -> ApiKeyRow | None:
        """The live key row ``key`` is (None when it is malformed, unknown, revoked or expired)."""
        m = _KEY.fullmatch(key)
        if m is None:
            return None
        with self.db.session() as s:
            row = s.scalar(select(ApiKeyRow).where(ApiKeyRow.prefix == m.group(1)))
        if row is None or not hmac.compare_digest(row.hash, _hash(key)) or row.revoked_at is not None:
            return None
        if row.expires_at is not None and row.expires_at.replace(tzinfo=row.expires_at.tzinfo or dt.UTC) <= utcnow():
            return None
        return row

    def any(self) -> bool:
        with self.db.session() as s:
            return s.scalar(select(ApiKeyRow.id).limit(1)) is not None

    def list(self, cursor: str | None, limit: int) -> tuple[list[ApiKeyRow], str | None]:
        with self.db.session() as s:
            return page(s, ApiKeyRow, cursor, limit)

    def revoke(self, key_id: str) -> ApiKeyRow:
        with self.db.session() as s:
            row = s.get(ApiKeyRow, key_id)
            if row is None:
                raise NotFound(f"no key {key_id!r}")
            if row.revoked_at is None:
                row.revoked_at = utcnow()
            return row
