"""The caller's own tenant settings (docs/api.md).

    GET   /v1/tenant/settings  -> {"openai_user_prefix": false}
    PATCH /v1/tenant/settings  {"openai_user_prefix": true} -> the settings after the change

`openai_user_prefix`: on the OpenAI routes, OpenAI's `user` field (which OpenAI clients
send to tag their end user) selects that user's personalized prefix `user:<user>` when it
exists, as the `user_id` extension does. Off by default: a tenant whose `user` values are
not its personalization user ids keeps getting the bare prefix.
"""

from __future__ import annotations

import asyncio
import dataclasses

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict

from prefix_store import TenantSettings
from server.api.auth import Caller, require_caller
from server.api.context import get_ctx

router = APIRouter(tags=["tenant"])


class TenantSettingsBody(BaseModel):
    openai_user_prefix: bool


class TenantSettingsPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    openai_user_prefix: bool | None = None


@router.get("/v1/tenant/settings", response_model=TenantSettingsBody)
async def get_settings(request: Request, caller: Caller = Depends(require_caller)) -> TenantSettingsBody:
    settings = await asyncio.to_thread(get_ctx(request).store.tenant_settings, caller.tenant)
    return TenantSettingsBody(**dataclasses.asdict(settings))


@router.patch("/v1/tenant/settings", response_model=TenantSettingsBody)
async def patch_settings(body: TenantSettingsPatch, request: Request,
                         caller: Caller = Depends(require_caller)) -> TenantSettingsBody:
    store = get_ctx(request).store

    def update() -> TenantSettings:
        current = store.tenant_settings(caller.tenant)
        return store.update_tenant_settings(
            caller.tenant, dataclasses.replace(current, **body.model_dump(exclude_none=True)))

    return TenantSettingsBody(**dataclasses.asdict(await asyncio.to_thread(update)))
