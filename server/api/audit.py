"""Auditing admin actions: every request to an admin route (`/v1/admin/...`, whoever sends it:
refused attempts are the interesting ones), and every write made with the admin key
(uploading or deleting the admin tenant's shared prefixes), is recorded before its response
leaves: who (the tenant its key maps to, "admin" for the admin key, and the key's sha256
prefix), what (method, route template, target), when, and the status it got.

Each entry goes to the store's capped stream (prefix_store/audit.py, read back by
`GET /v1/admin/audit`) and to the log as one JSON line (logger `prefix_serve.audit`), so a
Redis outage loses no record: the log line is still written.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prefix_store import StoreUnavailableError
from prefix_store.audit import AuditEntry, AuditLog
from server.metrics import TENANT_STATE_KEY

log = logging.getLogger("prefix_serve.audit")

ADMIN_PATH = "/v1/admin/"
TARGET_STATE_KEY = "audit_target"  # a route may name its target (request.state.audit_target = ...)
_WRITES = {"POST", "PUT", "PATCH", "DELETE"}


def key_id(authorization: str | None) -> str:
    """Names the key presented, never reveals it: 12 hex digits of its sha256."""
    if not authorization or not authorization.lower().startswith("bearer "):
        return ""
    return hashlib.sha256(authorization[7:].strip().encode()).hexdigest()[:12]


class AuditMiddleware:
    """Pure ASGI; added first, so it is the innermost middleware and sees the routed scope."""

    def __init__(self, app: ASGIApp, audit: AuditLog, admin_tenant: str) -> None:
        self.app = app
        self.audit = audit
        self.admin_tenant = admin_tenant

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        recorded = False

        async def send_recorded(message: Message) -> None:
            nonlocal recorded
            if message["type"] == "http.response.start" and not recorded:
                recorded = True
                await self._record(scope, int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, send_recorded)
        except Exception:
            if not recorded:  # a crash: the 500 is answered outside, but the attempt is recorded
                recorded = True
                await self._record(scope, 500)
            raise

    async def _record(self, scope: Scope, status: int) -> None:
        state = scope.get("state", {})
        actor = str(state.get(TENANT_STATE_KEY, ""))
        path, method = scope.get("path", ""), scope.get("method", "")
        if not (path.startswith(ADMIN_PATH) or (method in _WRITES and actor == self.admin_tenant)):
            return
        route = getattr(scope.get("route"), "path", None) or path[:200]
        target = state.get(TARGET_STATE_KEY) or ",".join(str(v)[:200] for v in scope.get("path_params", {}).values())
        headers = dict(scope.get("headers", ()))
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        client = scope.get("client") or ("", 0)
        entry = AuditEntry(time=time.time(), actor=actor, key_id=key_id(authorization), action=f"{method} {route}",
                           target=str(target), status=status, client=str(client[0]))
        log.info("%s", entry.to_json())
        try:
            await asyncio.to_thread(self.audit.append, entry)
        except StoreUnavailableError:
            log.warning("the audit entry above was not stored: the prefix store is unreachable")
