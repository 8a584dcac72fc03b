"""Who is calling: the bearer key of a request checked against the keys (a few seconds' cache, so
that a revoked key stops working everywhere within ``KEY_TTL_S``; while the database is unreachable,
a key seen at most ``stale_s`` ago is still taken), the admin key made on first start, and the
FastAPI dependencies the routes declare (which also put the scheme in OpenAPI)."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.common.edge import KEY_TTL_S
from service.common.ttl import TtlCache
from zoo_store.core.errors import Forbidden, Unauthorized, Unavailable
from zoo_store.store.db import Database, utcnow
from zoo_store.store.tenancy import SIGN_IN, Caller, Keys, well_formed

log = logging.getLogger("zoo.auth")
ADMIN_KEY_FILE = "admin.key"
ADMIN_KEY_LOCK = 0x5A00_0003  # one process makes the first admin key
LOCAL = Caller(tenant="local", admin=True)  # every caller when ZOO_AUTH=off


class Auth:
    def __init__(self, db: Database, enabled: bool, stale_s: float = 0.0):
        self.keys, self.enabled, self.stale_s = Keys(db), enabled, stale_s
        # sha256(key) -> (Caller, when it expires or None), or None: not a live key
        self._seen = TtlCache(KEY_TTL_S, max_items=10_000)

    def caller(self, key: str | None) -> Caller:
        """The caller a bearer key is; Unauthorized when there is none or it is not a live key."""
        if not self.enabled:
            return LOCAL
        if not key:
            raise Unauthorized("this route needs an API key: Authorization: Bearer <key> (zoo keys create)")
        if not well_formed(key):  # refused without a lookup, and never cached: no one fills the cache with junk
            raise Unauthorized("the API key is unknown, revoked or expired")
        found = self._seen.get_or(
            hashlib.sha256(key.encode()).digest(),
            lambda: self._lookup(key),
            stale_s=self.stale_s,
            stale_on=(Unavailable,),
        )
        if found is None or (found[1] is not None and found[1] <= utcnow()):
            raise Unauthorized("the API key is unknown, revoked or expired")
        if found[0].tenant == SIGN_IN:
            raise Unauthorized("a sign-in token is not an API key: the dashboard exchanges it (POST /v1/keys/exchange)")
        return found[0]

    def _lookup(self, key: str) -> tuple[Caller, dt.datetime | None] | None:
        row = self.keys.find(key)
        if row is None:
            return None
        expires = row.expires_at.replace(tzinfo=row.expires_at.tzinfo or dt.UTC) if row.expires_at else None
        return Caller(row.tenant, row.admin, row.id), expires

    def first_admin_key(self, data_dir: Path) -> Path | None:
        """With auth on and no key at all, an admin key written to ``data_dir/admin.key`` (mode 0600);
        its path (None when there were keys already)."""
        if not self.enabled:
            return None
        with self.keys.db.exclusive(ADMIN_KEY_LOCK):
            if self.keys.any():
                return None
            _, key = self.keys.create("admin", admin=True)
            path = data_dir / ADMIN_KEY_FILE
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            os.fchmod(fd, 0o600)  # an older file of another mode: this user's only, before the key is in it
            with os.fdopen(fd, "w") as f:
                f.write(key + "\n")
        log.warning("first start: an admin API key was written to %s (readable by this user only)", path.resolve())
        return path


bearer = HTTPBearer(
    auto_error=False, description="An API key (`zoo keys create`; the first admin key: ZOO_DATA_DIR/admin.key)"
)


def get_caller(request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Caller:
    caller = request.app.state.services.auth.caller(creds.credentials if creds else None)
    request.state.caller = caller  # for the audit log
    return caller


CallerDep = Annotated[Caller, Depends(get_caller)]


def get_admin(caller: CallerDep) -> Caller:
    if not caller.admin:
        raise Forbidden(f"this route needs an admin key; tenant {caller.tenant!r}'s key is not one")
    return caller


AdminDep = Annotated[Caller, Depends(get_admin)]
