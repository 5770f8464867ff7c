"""What every route reaches through `request.app.state.ctx`: the parts the app was built from."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request

from prefix_store import PrefixStore
from prefix_store.audit import AuditLog
from prefix_store.job_queue import JobQueue
from server.api.admission import Admission
from server.api.auth import Authenticator
from server.api.drain import Drain
from server.config import Settings
from server.engine.async_engine import AsyncEngine
from server.metrics import Metrics
from server.api.prefix_resolver import PrefixResolver


@dataclass
class ServerContext:
    settings: Settings
    engine: AsyncEngine
    store: PrefixStore
    resolver: PrefixResolver
    auth: Authenticator
    model_name: str  # what OpenAI clients send as `model` for the base model (no prefix)
    started_at: float = field(default_factory=time.time)
    ready: bool = False  # set once the engine loop runs (lifespan)
    metrics: Metrics = field(default_factory=Metrics)  # this app's own registry (/metrics)
    jobs: JobQueue | None = None  # personalization jobs (routes_personalize)
    audit: AuditLog | None = None  # admin actions (server/api/audit.py, GET /v1/admin/audit)
    drain: Drain = field(default_factory=Drain)  # SIGTERM: finish what runs, 503 to new requests
    admission: Admission | None = None  # per-tenant queue caps and token rates (generation)

    @property
    def spec(self):
        return self.engine.spec

    @property
    def tokenizer(self):
        return self.engine.tokenizer


def get_ctx(request: Request) -> ServerContext:
    return request.app.state.ctx
