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
from prefix_store.job_queue import JobQueue
from server.api import (routes_admin, routes_generate, routes_openai, routes_ops, routes_personalize, routes_tenant,
                        routes_prefixes)
from server.api.auth import Authenticator
from server.api.body_limit import BodyLimitMiddleware
from server.api.context import ServerContext
from server.api.errors import install_error_handlers
from server.config import Settings
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
                              shared_prefixes=settings.shared_prefixes, on_stale=engine.drop_stale_prefix)
    auth = Authenticator(store, settings.admin_key.get_secret_value(), settings.admin_tenant)
    ctx = ServerContext(settings=settings, engine=engine, store=store, resolver=resolver, auth=auth,
                        model_name=model_name)
    # Same Redis and namespace as the store: workers (`prefix-serve worker`) read this queue.
    ctx.jobs = JobQueue(store.redis_url, store.keys.namespace, max_active_per_tenant=settings.max_jobs_per_tenant)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        # Waits up to 2 s for Redis, then keeps retrying in the background: the server also
        # starts (and serves resident prefixes) while Redis is away.
        subscription = await asyncio.to_thread(store.subscribe, resolver.on_event, resolver.on_reconnect)
        metrics_server = (ctx.metrics.serve_http(settings.metrics_port, settings.metrics_host)
                          if settings.metrics_port is not None else None)
        ctx.ready = True
        try:
            yield
        finally:
            ctx.ready = False
            await engine.shutdown(settings.drain_timeout_s)
            await asyncio.to_thread(subscription.close)
            ctx.jobs.close()
            if metrics_server is not None:
                metrics_server[0].shutdown()

    docs = {} if settings.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="prefix-serve", version="1", lifespan=lifespan,
                  description="Multi-tenant serving of prefix-tuned language models.", **docs)
    app.state.ctx = ctx
    install_error_handlers(app)
    for module in (routes_generate, routes_openai, routes_prefixes, routes_personalize, routes_tenant,
                   routes_admin, routes_ops):
        app.include_router(module.router)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes,
                       max_upload_bytes=settings.max_upload_bytes)
    # snapshot sources are read at scrape time; added last = outermost, so 413s count too
    ctx.metrics.watch_engine(engine.stats, lambda: engine.num_waiting)
    ctx.metrics.watch_host_cache(resolver.cache)
    ctx.metrics.watch_store_errors(lambda: store.errors)
    resolver.on_load = ctx.metrics.observe_prefix_load
    ctx.metrics.watch_jobs(ctx.jobs.status_counts)
    app.add_middleware(MetricsMiddleware, metrics=ctx.metrics)
    return app
