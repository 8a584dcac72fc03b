"""Tenants and API keys: who is calling (a key names a tenant, and whether it is an admin's). Keys
are random, shown once and kept only as their SHA-256, found by the short prefix they start with."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import select, update

from zoo_store.core.errors import InvalidInput, NotFound, Unauthorized
from zoo_store.store.db import ApiKeyRow, Database, new_id, page, utcnow

TENANT = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
SIGN_IN = "sign-in"  # the tenant of sign-in tokens: a browser exchanges one, once, for an admin key
RESERVED = ("admin", "local", SIGN_IN)  # the first admin key's, every caller's when auth is off, sign-in tokens'
SIGN_IN_TTL = dt.timedelta(minutes=15)  # a sign-in link works this long, once
SIGNED_IN_TTL = dt.timedelta(days=7)  # the admin key a sign-in link is exchanged for works this long
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


def _new_key(tenant: str, admin: bool, expires_at: dt.datetime | None) -> tuple[ApiKeyRow, str]:
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
    return row, key


def is_sign_in(row: ApiKeyRow) -> bool:
    """A sign-in token: of tenant ``sign-in``, no admin's, made to last at most ``SIGN_IN_TTL`` (a key an
    earlier release made for a tenant of that name is none of these)."""
    if row.tenant != SIGN_IN or row.admin or row.expires_at is None:
        return False
    return row.expires_at - row.created_at <= SIGN_IN_TTL + dt.timedelta(seconds=1)


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Keys:
    def __init__(self, db: Database):
        self.db = db

    def create(self, tenant: str, admin: bool = False, expires_at: dt.datetime | None = None) -> tuple[ApiKeyRow, str]:
        """A new key for ``tenant``: its row and the key itself (shown once, never stored)."""
        check_tenant(tenant)
        if tenant == SIGN_IN:
            raise InvalidInput(f"tenant {SIGN_IN!r} is for sign-in tokens (zoo dashboard makes them)")
        if tenant in RESERVED and not admin:
            raise InvalidInput(f"tenant {tenant!r} is for admins' keys (the first admin key's, or ZOO_AUTH=off's)")
        if expires_at is not None and expires_at.astimezone(dt.UTC) <= utcnow():
            raise InvalidInput("expires_at is in the past")
        return self._add(tenant, admin, expires_at)

    def _add(self, tenant: str, admin: bool, expires_at: dt.datetime | None) -> tuple[ApiKeyRow, str]:
        row, key = _new_key(tenant, admin, expires_at)
        with self.db.session() as s:
            s.add(row)
        return row, key

    def sign_in_token(self) -> tuple[ApiKeyRow, str]:
        """A one-time sign-in token (a key of tenant ``sign-in``, good for nothing but ``exchange``)."""
        return self._add(SIGN_IN, False, utcnow() + SIGN_IN_TTL)

    def exchange(self, token: str) -> tuple[ApiKeyRow, ApiKeyRow, str]:
        """A new admin key (``SIGNED_IN_TTL``) for a live sign-in token, which is revoked: the first of
        any number of processes exchanging it at once gets the key, the others ``Unauthorized``.
        Returns the token's row, the new key's row and the new key."""
        row = self.find(token)
        if row is None or not is_sign_in(row):
            raise Unauthorized("the sign-in link is unknown, used or expired: zoo dashboard makes another")
        new, key = _new_key("admin", True, utcnow() + SIGNED_IN_TTL)
        with self.db.session() as s:  # one transaction: the token spent and the key made, or neither
            taken = s.execute(
                update(ApiKeyRow)
                .where(ApiKeyRow.id == row.id, ApiKeyRow.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            ).rowcount
            if taken != 1:
                raise Unauthorized("the sign-in link is unknown, used or expired: zoo dashboard makes another")
            s.add(new)
        return row, new, key

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
        """Whether any key was ever made (sign-in tokens aside: one made with auth off is no admin key)."""
        with self.db.session() as s:
            return s.scalar(select(ApiKeyRow.id).where(ApiKeyRow.tenant != SIGN_IN).limit(1)) is not None

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
