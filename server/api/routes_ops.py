"""Operations: `/health` (liveness: the process and its engine loop live), `/ready` (model
loaded and store reachable), `/metrics` (Prometheus text format of this app's registry,
server/metrics.py).

A liveness probe should restart the process when /health answers 503: the engine loop
died (a bug; a bad request only fails itself), and no request can be served until then.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from server.api.auth import bearer_matches
from server.api.context import get_ctx
from server.api.errors import error_response

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health(request: Request) -> Response:
    ctx = get_ctx(request)
    if ctx.ready and not ctx.engine.is_alive:
        return error_response(503, f"the engine loop died ({ctx.engine.error!r}); restart the process",
                              "service_unavailable")
    return JSONResponse({"status": "ok"})


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
    ctx = get_ctx(request)
    s = ctx.settings
    if s.metrics_port is not None:
        return error_response(404, f"/metrics is served on port {s.metrics_port} of {s.metrics_host} "
                                   "(metrics_port), not on the API port")
    if s.metrics_need_key:
        keys = [k.get_secret_value() for k in (s.metrics_key, s.admin_key) if k is not None]
        if not any(bearer_matches(request.headers.get("authorization"), k) for k in keys):
            return error_response(401, "/metrics needs 'Authorization: Bearer <metrics key or admin key>' "
                                       "(see metrics_key and metrics_port in docs/deployment.md)",
                                  headers={"WWW-Authenticate": "Bearer"})
    body, content_type = ctx.metrics.render()
    return Response(body, media_type=content_type)
