"""Admin routes (admin key only): create, list and delete tenants, rotate a tenant's key, read
and set a tenant's limits and usage, read the audit log.

The admin key acts as the admin tenant (`admin_tenant`, default "admin"); that tenant's
prefixes are shared read-only with every tenant as `shared/<id>`, so its id is reserved.
Its limits are the defaults. Every request to these routes is recorded in the audit log
(server/api/audit.py).
"""

from __future__ import annotations

import asyncio
import re

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel

from server.prefix import shorten
from server.api.audit import TARGET_STATE_KEY
from server.api.auth import Caller, require_admin
from server.api.context import ServerContext, get_ctx
from server.api.errors import ApiError
from server.api.schemas import (CreateTenantRequest, CreateTenantResponse, RotateKeyResponse, SetTenantLimits,
                                StorageInfo, TenantInfo, TenantLimitsFields, TenantList)

router = APIRouter(tags=["admin"])


@router.post("/v1/admin/tenants", response_model=CreateTenantResponse, status_code=201)
async def create_tenant(body: CreateTenantRequest, request: Request,
                        _: Caller = Depends(require_admin)) -> CreateTenantResponse:
    ctx = get_ctx(request)
    setattr(request.state, TARGET_STATE_KEY, body.tenant_id[:64])
    if body.tenant_id == ctx.settings.admin_tenant:
        raise ApiError(409, f"tenant id {body.tenant_id!r} is reserved for the admin key", "conflict_error")
    api_key = await asyncio.to_thread(ctx.store.create_tenant, body.tenant_id)
    ctx.admission.forget(body.tenant_id)
    return CreateTenantResponse(tenant_id=body.tenant_id, api_key=api_key)


@router.get("/v1/admin/tenants", response_model=TenantList)
async def list_tenants(request: Request, _: Caller = Depends(require_admin)) -> TenantList:
    ctx = get_ctx(request)
    ids = await asyncio.to_thread(ctx.store.list_tenants)
    infos = [await asyncio.to_thread(tenant_info, ctx, t) for t in ids]
    return TenantList(data=ids, tenants=[i for i in infos if i is not None])


@router.get("/v1/admin/tenants/{tenant_id}", response_model=TenantInfo)
async def get_tenant(tenant_id: str, request: Request, _: Caller = Depends(require_admin)) -> TenantInfo:
    info = await asyncio.to_thread(tenant_info, get_ctx(request), tenant_id)
    if info is None:
        raise ApiError(404, f"tenant {shorten(tenant_id)} not found", "not_found_error")
    return info


@router.put("/v1/admin/tenants/{tenant_id}/limits", response_model=TenantInfo)
async def set_limits(tenant_id: str, body: SetTenantLimits, request: Request,
                     _: Caller = Depends(require_admin)) -> TenantInfo:
    """Replace the tenant's limits: the fields given are set, the others take the defaults.
    Every replica applies them within a few seconds; storage quotas apply to the next write."""
    ctx = get_ctx(request)
    if tenant_id == ctx.settings.admin_tenant:
        raise ApiError(400, f"{tenant_id!r} is the admin tenant: its limits are the server's defaults "
                            "(tenant_* settings)")
    overrides = body.model_dump(exclude_none=True)
    try:
        ctx.settings.tenant_limits().overridden(overrides)
    except ValueError as e:
        raise ApiError(400, str(e)) from e
    if not await asyncio.to_thread(ctx.store.set_tenant_limits, tenant_id, overrides):
        raise ApiError(404, f"tenant {shorten(tenant_id)} not found", "not_found_error")
    ctx.admission.forget(tenant_id)
    return await asyncio.to_thread(tenant_info, ctx, tenant_id)


@router.delete("/v1/admin/tenants/{tenant_id}", status_code=204)
async def delete_tenant(tenant_id: str, request: Request, _: Caller = Depends(require_admin)) -> Response:
    """The tenant, its key, its prefixes (user prefixes included) and its jobs (running ones
    are stopped and publish nothing). A tenant created again under the name starts empty."""
    ctx = get_ctx(request)
    if tenant_id == ctx.settings.admin_tenant:
        raise ApiError(400, f"{tenant_id!r} is the admin tenant (the admin key's own, whose shared prefixes every "
                            "tenant may use); it cannot be deleted: delete its prefixes one by one instead")
    if not await asyncio.to_thread(ctx.store.delete_tenant, tenant_id):
        raise ApiError(404, f"tenant {shorten(tenant_id)} not found", "not_found_error")
    ctx.auth.forget(tenant_id)
    ctx.admission.forget(tenant_id)
    await asyncio.to_thread(ctx.jobs.delete_tenant, tenant_id)
    return Response(status_code=204)


@router.post("/v1/admin/tenants/{tenant_id}/rotate-key", response_model=RotateKeyResponse)
async def rotate_key(tenant_id: str, request: Request, _: Caller = Depends(require_admin)) -> RotateKeyResponse:
    """A new key for the tenant, shown once. The old key stops working at once: here, and on
    every other replica as soon as it hears the store's event (well within a second)."""
    ctx = get_ctx(request)
    if tenant_id == ctx.settings.admin_tenant:
        raise ApiError(400, "the admin key is not stored: change it with --admin-key / PREFIX_SERVE_ADMIN_KEY "
                            "and restart the servers")
    api_key = await asyncio.to_thread(ctx.store.rotate_key, tenant_id)
    if api_key is None:
        raise ApiError(404, f"tenant {shorten(tenant_id)} not found", "not_found_error")
    ctx.auth.forget(tenant_id)
    return RotateKeyResponse(tenant_id=tenant_id, api_key=api_key)


class AuditRecord(BaseModel):
    id: str  # pass as `before` to read older entries
    time: float
    actor: str  # "admin", a tenant id, or "" for no valid key
    key_id: str  # first 12 hex digits of the key's sha256
    action: str
    target: str
    status: int
    client: str


class AuditList(BaseModel):
    data: list[AuditRecord]  # newest first
    next: str | None  # `before` for the next page; null at the end


_ENTRY_ID = re.compile(r"\d{1,20}-\d{1,20}")


@router.get("/v1/admin/audit", response_model=AuditList)
async def read_audit(request: Request, limit: int = Query(100, ge=1, le=1000),
                     before: str | None = Query(None, description="an entry id: only older entries"),
                     _: Caller = Depends(require_admin)) -> AuditList:
    """Admin actions, newest first (this read is recorded once it is answered)."""
    if before is not None and not _ENTRY_ID.fullmatch(before):
        raise ApiError(400, f"before must be an entry id such as 1700000000000-0, got {shorten(before)}")
    entries = await asyncio.to_thread(get_ctx(request).audit.read, limit, before)
    return AuditList(data=[AuditRecord(**e.__dict__) for e in entries],
                     next=entries[-1].id if len(entries) == limit else None)


def tenant_info(ctx: ServerContext, tenant_id: str) -> TenantInfo | None:
    """Limits in force, overrides, storage and requests in flight; None if no such tenant
    (blocking: call it in a thread)."""
    overrides = {} if tenant_id == ctx.settings.admin_tenant else ctx.store.tenant_limit_overrides(tenant_id)
    if overrides is None:
        return None
    limits = ctx.settings.tenant_limits().overridden(overrides)
    return TenantInfo(tenant_id=tenant_id, limits=TenantLimitsFields(**limits.to_dict()), overrides=overrides,
                      storage=storage_info(ctx, tenant_id, limits),
                      requests_in_flight=ctx.admission.limiter.in_flight(tenant_id))


def storage_info(ctx: ServerContext, tenant_id: str, limits) -> StorageInfo:
    usage = ctx.store.storage_usage(tenant_id)
    return StorageInfo(bytes=usage.bytes, prefixes=usage.prefixes, max_storage_bytes=limits.max_storage_bytes,
                       max_prefixes=limits.max_prefixes)
