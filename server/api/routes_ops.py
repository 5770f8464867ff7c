"""Operations: `/health` (the process lives), `/ready` (model loaded and store reachable),
`/metrics` (Prometheus text format of this app's registry, server/metrics.py)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from server.api.context import get_ctx
from server.api.errors import error_response

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> Response:
    ctx = get_ctx(request)
    if not ctx.ready or not ctx.engine.is_alive:
        return error_response(503, "the engine is not running", "service_unavailable")
    if not await asyncio.to_thread(ctx.store.ping):
        return error_response(503, "the prefix store (Redis) is unreachable", "service_unavailable")
    return JSONResponse({"status": "ready", "model": ctx.model_name})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    body, content_type = get_ctx(request).metrics.render()
    return Response(body, media_type=content_type)
