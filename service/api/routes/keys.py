"""API keys, for admins: create (the key is in the answer, once), list, revoke; and signing a browser in
with a one-time token (``zoo serve`` prints a link with one, ``zoo dashboard`` asks for one and opens it)."""

from __future__ import annotations

import datetime as dt

from fastapi import APIRouter, Request

from service.api.audit import audit_target
from service.api.auth import AdminDep
from service.api.deps import Cursor, Limit, Svc
from service.api.openapi import CONFLICT, UNAUTHORIZED, UNAVAILABLE
from service.api.schemas import Key, KeyIn, NewKey, Page, SignIn, SignInToken
from zoo_store.core.errors import Conflict
from zoo_store.store.db import utcnow
from zoo_store.store.tenancy import SIGN_IN, Caller

router = APIRouter(prefix="/v1/keys", tags=["keys"])


@router.post("", status_code=201)
def create_key(body: KeyIn, request: Request, svc: Svc, _: AdminDep) -> NewKey:
    """A new key for a tenant (an admin's with ``admin``). The answer is the only time the key is shown."""
    expires = None if body.expires_in_days is None else utcnow() + dt.timedelta(days=body.expires_in_days)
    row, key = svc.auth.keys.create(body.tenant, body.admin, expires)
    audit_target(request, row.id)
    return NewKey(**Key.of(row).model_dump(), key=key)


@router.post("/sign-in", status_code=201)
def sign_in_token(request: Request, svc: Svc, _: AdminDep) -> SignIn:
    """A one-time sign-in token for a browser: open ``/#token=<token>`` (the fragment never reaches a
    server's log) within 15 minutes and the dashboard exchanges it for an admin key of its own."""
    row, token = svc.auth.keys.sign_in_token()
    audit_target(request, row.id)
    return SignIn(token=token, expires_at=row.expires_at)


@router.post("/exchange", status_code=201, responses=UNAUTHORIZED | UNAVAILABLE)
def exchange_sign_in(body: SignInToken, request: Request, svc: Svc) -> NewKey:
    """A sign-in token exchanged, once, for a new admin key that works for 7 days (no key needed: the
    token is the credential). A token used already, expired or unknown: 401."""
    token, row, key = svc.auth.keys.exchange(body.token)
    request.state.caller = Caller(SIGN_IN, admin=False, key_id=token.id)  # the audit row names the token spent
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
