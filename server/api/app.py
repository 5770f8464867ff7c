"""The FastAPI application factory. Everything the app uses is passed in, so tests build it
around a tiny model and a test Redis, and `prefix-serve serve` around the real ones.

The lifespan starts the engine loop and the store-event subscription, and on shutdown
lets running requests drain before the loop stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from prefix_store import PrefixStore
from prefix_store.audit import AuditLog
from prefix_store.job_queue import JobQueue
from prefix_store.rate_limits import RateLimiter
from server.api import (routes_admin, routes_classify, routes_generate, routes_openai, routes_ops, routes_personalize,
                        routes_prefixes, routes_tenant, routes_tokenize)
from server.api.admission import Admission
from server.api.audit import AuditMiddleware
from server.api.auth import Authenticator
from server.api.body_limit import BodyLimitMiddleware
from server.api.context import ServerContext
from server.api.drain import DrainMiddleware
from server.api.errors import install_error_handlers
from server.config import Settings
from server.prefix import ModelKind
from server.engine.async_engine import AsyncEngine
from server.api.metrics_middleware import MetricsMiddleware
from server.api.host_prefixes import HostPrefixes
from server.api.prefix_resolver import PrefixResolver

log = logging.getLogger(__name__)


def create_app(settings: Settings, engine: AsyncEngine, store: PrefixStore, *, model_name: str) -> FastAPI:
    """The app for `engine` (not started yet: the lifespan starts and stops it) and `store`."""
    if settings.admin_key is None:
        raise ValueError("create_app needs settings.admin_key (`serve` generates one on loopback)")
    engine.connect()  # the spec of the model (an engine process loads it now)
    spec = engine.spec
    resolver = PrefixResolver(store, engine.make_prefix, HostPrefixes(settings.host_cache_bytes),
                              spec.fingerprint, admin_tenant=settings.admin_tenant,
                              shared_prefixes=settings.shared_prefixes, on_stale=engine.drop_stale_prefix,
                              max_concurrent_loads=settings.prefix_load_concurrency, serving_dtype=engine.dtype,
                              with_heads=spec.kind is ModelKind.SEQ_CLS)
    auth = Authenticator(store, settings.admin_key.get_secret_value(), settings.admin_tenant)
    ctx = ServerContext(settings=settings, engine=engine, store=store, resolver=resolver, auth=auth,
                        model_name=model_name)
    # Same Redis and namespace as the store: workers (`prefix-serve worker`) read this queue.
    ctx.jobs = JobQueue(store.redis_url, store.keys.namespace, max_active_per_tenant=settings.max_jobs_per_tenant,
                        wait_replicas=store.wait_replicas, wait_timeout_ms=store.wait_timeout_ms)
    ctx.audit = AuditLog(store.redis_url, store.keys.namespace)
    limiter = RateLimiter(store.redis_url, store.keys.namespace)
    ctx.admission = Admission(store, limiter, settings.tenant_limits(), max_hold_s=settings.request_timeout_s + 60)

    def on_reconnect() -> None:  # events published while we were away are lost
        resolver.on_reconnect()
        auth.forget_all()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        # Waits up to 2 s for Redis, then keeps retrying in the background: the server also
        # starts (and serves resident prefixes) while Redis is away.
        subscription = await asyncio.to_thread(store.subscribe, resolver.on_event, on_reconnect,
                                               on_tenant_event=auth.on_tenant_event)
        auth.events_live = lambda: subscription.ready
        metrics_server = (ctx.metrics.serve_http(settings.metrics_port, settings.metrics_host)
                          if settings.metrics_port is not None else None)
        renewals = asyncio.ensure_future(ctx.admission.run_renewals())
        ctx.ready = True
        try:
            yield
        finally:
            ctx.ready = False
            await engine.shutdown(settings.drain_timeout_s)
            auth.events_live = lambda: False
            renewals.cancel()
            await asyncio.to_thread(subscription.close)
            ctx.jobs.close()
            ctx.audit.close()
            limiter.close()
            if metrics_server is not None:
                metrics_server[0].shutdown()

    docs = {} if settings.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    # redirect_slashes off: "/v1/prefixes/" (an empty id) is a 404, not a redirect to another route
    app = FastAPI(title="prefix-serve", version="1", lifespan=lifespan, redirect_slashes=False,
                  description="Multi-tenant serving of prefix-tuned language models.", **docs)
    app.state.ctx = ctx
    install_error_handlers(app)
    for module in (routes_generate, routes_classify, routes_openai, routes_tokenize, routes_prefixes, routes_personalize, routes_tenant,
                   routes_admin, routes_ops):
        app.include_router(module.router)
    app.add_middleware(AuditMiddleware, audit=ctx.audit, admin_tenant=settings.admin_tenant)  # innermost
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes,
                       max_upload_bytes=settings.max_upload_bytes)
    app.add_middleware(DrainMiddleware, drain=ctx.drain, retry_after_s=settings.retry_after_s)
    # snapshot sources are read at scrape time; added last = outermost, so 413s count too
    ctx.metrics.watch_engine(engine.stats, lambda: engine.num_waiting)
    ctx.metrics.watch_host_cache(resolver.cache)
    if engine.arena is not None:
        ctx.metrics.watch_arena(engine.arena)
    ctx.metrics.watch_store_errors(lambda: store.errors)
    resolver.on_load = ctx.metrics.observe_prefix_load
    ctx.metrics.watch_jobs(ctx.jobs.status_counts)
    app.add_middleware(MetricsMiddleware, metrics=ctx.metrics)
    return app
