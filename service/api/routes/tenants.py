"""Tenants, for admins: a tenant's limits and what it holds; its limits set; the audit log."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from service.api.auth import AdminDep
from service.api.deps import Cursor, Limit, Svc
from service.api.quotas import Limits
from service.api.schemas import Audit, Page, Tenant

router = APIRouter(prefix="/v1", tags=["tenants"])


class TenantInfo(BaseModel):
    tenant: str
    limits: Limits  # in effect: its own where set, the Settings' defaults elsewhere
    usage: dict[str, int]  # jobs queued or running, paths owned, their bytes, uploads' bytes


@router.get("/tenants/{tenant}")
def get_tenant(tenant: Tenant, svc: Svc, _: AdminDep) -> TenantInfo:
    return TenantInfo(tenant=tenant, limits=svc.quotas.limits(tenant), usage=svc.store.usage(tenant))


@router.put("/tenants/{tenant}/limits")
def put_limits(tenant: Tenant, limits: Limits, svc: Svc, _: AdminDep) -> TenantInfo:
    """Set a tenant's limits (replacing what was set; a field left out takes the Settings' default)."""
    return TenantInfo(tenant=tenant, limits=svc.quotas.set_limits(tenant, limits), usage=svc.store.usage(tenant))


@router.get("/audit")
def list_audit(
    svc: Svc, _: AdminDep, cursor: Cursor = None, limit: Limit = 100, tenant: Tenant | None = None
) -> Page[Audit]:
    """Every mutating call, oldest first (one tenant's with ``tenant``)."""
    rows, nxt = svc.audit.list(cursor, limit, tenant)
    return Page(items=[Audit.model_validate(r, from_attributes=True) for r in rows], next_cursor=nxt)
