"""`Authorization: Bearer <key>` -> the calling tenant.

The admin key (settings) is compared in constant time and acts as the admin tenant.
Tenant keys are looked up in the store, which holds only their sha256. A successful lookup
is remembered (by hash) for up to `ttl_s`, so most requests cost no Redis round trip and
requests keep being authenticated while Redis is briefly away.

NOTE: revocation. A deleted tenant's or a rotated key must stop working on every replica
at once, not after `ttl_s`. The store publishes a TenantEvent for both; every replica's
subscription calls `on_tenant_event`, which forgets the tenant's remembered keys. Three
gaps are closed: keys are remembered and trusted only while the subscription is live
(`events_live`; otherwise every request asks Redis); a re-subscription forgets everything
(events published while it was down are lost); and a lookup that was in flight while an
event arrived is not remembered (the epoch check), since it may have read the old key.
While Redis is unreachable, a key remembered earlier still works (nothing can be revoked
without Redis).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request

from prefix_store import PrefixStore, StoreUnavailableError
from prefix_store.record import TenantEvent
from server.api.errors import ApiError

_BEARER = "bearer "


@dataclass(frozen=True)
class Caller:
    tenant: str
    is_admin: bool = False


class Authenticator:
    def __init__(self, store: PrefixStore, admin_key: str, admin_tenant: str = "admin", ttl_s: float = 30.0,
                 max_remembered: int = 10_000) -> None:
        self.store = store
        self._admin_digest = _digest(admin_key)
        self.admin_tenant = admin_tenant
        self.ttl_s = ttl_s
        self.max_remembered = max_remembered
        self._known: dict[str, tuple[str, float]] = {}  # sha256(key) -> (tenant, time confirmed)
        self._epoch = 0  # +1 at every revocation heard (see the module's NOTE)
        self._lock = threading.Lock()
        # True while revocations reach us (the app sets it to its subscription's state)
        self.events_live: Callable[[], bool] = lambda: False

    async def authenticate(self, authorization: str | None) -> Caller:
        key = _bearer_key(authorization)
        digest = _digest(key)
        # Compare digests, not keys: constant time regardless of the key's length.
        if hmac.compare_digest(digest, self._admin_digest):
            return Caller(self.admin_tenant, is_admin=True)
        now = time.monotonic()
        live = self.events_live()
        with self._lock:
            known = self._known.get(digest)
            epoch = self._epoch
        if known is not None and now - known[1] < self.ttl_s and live:
            return Caller(known[0])
        try:
            tenant = await asyncio.to_thread(self.store.tenant_for_key, key)
        except StoreUnavailableError as e:
            if known is not None:  # confirmed before: keep serving while the store is away
                return Caller(known[0])
            raise ApiError(503, "cannot check the API key: the prefix store is unreachable; retry shortly",
                           "service_unavailable", {"Retry-After": "1"}) from e
        if tenant is None:
            with self._lock:
                self._known.pop(digest, None)
            raise ApiError(401, "invalid API key", "authentication_error", {"WWW-Authenticate": "Bearer"})
        with self._lock:
            if live and epoch == self._epoch:  # events flowed, and none arrived while we looked
                if len(self._known) >= self.max_remembered:
                    self._known.clear()
                self._known[digest] = (tenant, now)
        return Caller(tenant)

    def forget(self, tenant: str) -> None:
        """Drop remembered keys of a tenant (deleted, or its key rotated)."""
        with self._lock:
            self._epoch += 1
            for digest in [d for d, (t, _) in self._known.items() if t == tenant]:
                del self._known[digest]

    def forget_all(self) -> None:
        """Drop every remembered key (the event subscription reconnected: events may be lost)."""
        with self._lock:
            self._epoch += 1
            self._known.clear()

    def on_tenant_event(self, event: TenantEvent) -> None:
        """The store's subscription: a tenant was deleted or its key rotated, on any replica."""
        self.forget(event.tenant)


def bearer_matches(authorization: str | None, key: str) -> bool:
    """The header carries exactly `key` as a bearer token (compared in constant time)."""
    if not authorization or not authorization.lower().startswith(_BEARER):
        return False
    return hmac.compare_digest(_digest(authorization[len(_BEARER):].strip()), _digest(key))


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _bearer_key(authorization: str | None) -> str:
    if not authorization:
        raise ApiError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                       "authentication_error", {"WWW-Authenticate": "Bearer"})
    if not authorization.lower().startswith(_BEARER) or not authorization[len(_BEARER):].strip():
        raise ApiError(401, "malformed Authorization header: expected 'Bearer <key>'",
                       "authentication_error", {"WWW-Authenticate": "Bearer"})
    return authorization[len(_BEARER):].strip()


# --- FastAPI dependencies

async def require_caller(request: Request) -> Caller:
    caller = await request.app.state.ctx.auth.authenticate(request.headers.get("authorization"))
    request.state.tenant = caller.tenant  # the metrics label of this request
    return caller


async def require_admin(request: Request) -> Caller:
    caller = await require_caller(request)
    if not caller.is_admin:
        raise ApiError(403, "this route needs the admin key", "permission_error")
    return caller
