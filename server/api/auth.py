"""`Authorization: Bearer <key>` -> the calling tenant.

The admin key (settings) is compared in constant time and acts as the admin tenant.
Tenant keys are looked up in the store, which holds only their sha256. A successful lookup
is remembered for a short while (by hash), so requests keep being authenticated while
Redis is briefly away; a deleted or rotated key stops working within `ttl_s`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import threading
import time
from dataclasses import dataclass

from fastapi import Request

from prefix_store import PrefixStore, StoreUnavailableError
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
        self._lock = threading.Lock()

    async def authenticate(self, authorization: str | None) -> Caller:
        key = _bearer_key(authorization)
        digest = _digest(key)
        # Compare digests, not keys: constant time regardless of the key's length.
        if hmac.compare_digest(digest, self._admin_digest):
            return Caller(self.admin_tenant, is_admin=True)
        now = time.monotonic()
        with self._lock:
            known = self._known.get(digest)
        if known is not None and now - known[1] < self.ttl_s:
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
            if len(self._known) >= self.max_remembered:
                self._known.clear()
            self._known[digest] = (tenant, now)
        return Caller(tenant)

    def forget(self, tenant: str) -> None:
        """Drop remembered keys of a tenant (after it was deleted through this server)."""
        with self._lock:
            for digest in [d for d, (t, _) in self._known.items() if t == tenant]:
                del self._known[digest]


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
