"""API keys, for admins: create (the key is in the answer, once), list, revoke."""

from __future__ import annotations

import datetime as dt

from fastapi import APIRouter, Request

from service.api.audit import audit_target
from service.api.auth import AdminDep
from service.api.deps import Cursor, Limit, Svc
from service.api.openapi import CONFLICT
from service.api.schemas import Key, KeyIn, NewKey, Page
from zoo_store.core.errors import Conflict
from zoo_store.store.db import utcnow

router = APIRouter(prefix="/v1/keys", tags=["keys"])


@router.post("", status_code=201)
def create_key(body: KeyIn, request: Request, svc: Svc, _: AdminDep) -> NewKey:
    """A new key for a tenant (an admin's with ``admin``). The answer is the only time the key is shown."""
    expires = None if body.expires_in_days is None else utcnow() + dt.timedelta(days=body.expires_in_days)
    row, key = svc.auth.keys.create(body.tenant, body.admin, expires)
    audit_target(request, row.id)
    return NewKey(**Key.of(row).model_dump(), key=key)


@router.get("")
def list_keys(svc: Svc, _: AdminDep, cursor: Cursor = None, limit: Limit = 100) -> Page[Key]:
    rows, nxt = svc.auth.keys.list(cursor, limit)
    return Page(items=[Key.of(r) for r in rows], next_cursor=nxt)


@router.delete("/{key_id}", responses=CONFLICT)
def revoke_key(key_id: str, svc: Svc, caller: AdminDep) -> Key:
    """Revoke a key: refused everywhere within seconds. The key stays listed, with ``revoked_at``.
    Not the key of this request (409): an admin cannot lock itself out; another admin revokes it."""
    if key_id == caller.key_id:
        raise Conflict("this is the key of this request: revoke it with another admin's key")
    return Key.of(svc.auth.keys.revoke(key_id))
