"""Per-tenant admission of generation requests, the same on every replica: the tenant's
limits (the admin's overrides stored with the tenant, over the defaults in Settings), its
queue cap and its token rate (prefix_store/rate_limits.py: one Lua script in Redis).

    admit(tenant, request_id, cost)  before the request reaches the engine (429 beyond a limit)
    release(tenant, request_id)      when it ends, however it ends

# NOTE: limits are remembered for `cache_s` seconds per tenant, so a change by the admin
# reaches every replica within that time (at once on the replica that made it). The
# leases this replica holds are renewed in the background (`run_renewals`) for at most
# `max_hold_s` (a request never lives longer than its timeout); if the replica dies, its
# slots come back when their leases expire. When Redis is unreachable, requests
# are admitted without a lease (the engine's own queue share still protects the others):
# an outage of the store must not stop requests on resident prefixes.
"""

from __future__ import annotations

import asyncio
import logging
import time

from prefix_store import PrefixStore, StoreUnavailableError
from prefix_store.rate_limits import RateLimiter
from prefix_store.tenant_limits import TenantLimits

log = logging.getLogger(__name__)


class Admission:
    def __init__(self, store: PrefixStore, limiter: RateLimiter, defaults: TenantLimits, *, cache_s: float = 2.0,
                 max_hold_s: float = 3600.0) -> None:
        self.store = store
        self.limiter = limiter
        self.defaults = defaults
        self.cache_s = cache_s
        self.max_hold_s = max_hold_s
        self._limits: dict[str, tuple[TenantLimits, float]] = {}  # tenant -> (limits, when read)
        self._leases: dict[tuple[str, str], float] = {}  # (tenant, request id) held here -> when taken
        self.unguarded = 0  # requests admitted without a lease because Redis was unreachable

    async def limits_of(self, tenant: str) -> TenantLimits:
        cached = self._limits.get(tenant)
        if cached is not None and time.monotonic() - cached[1] < self.cache_s:
            return cached[0]
        try:
            overrides = await asyncio.to_thread(self.store.tenant_limit_overrides, tenant)
        except StoreUnavailableError:
            return cached[0] if cached is not None else self.defaults
        limits = self.defaults.overridden(overrides)
        if len(self._limits) > 100_000:
            self._limits.clear()
        self._limits[tenant] = (limits, time.monotonic())
        return limits

    def forget(self, tenant: str) -> None:
        """Read the tenant's limits again at its next request (they were just changed here)."""
        self._limits.pop(tenant, None)

    async def admit(self, tenant: str, request_id: str, cost: int) -> None:
        """Raises RateLimitedError (429) or OverLimitError (400) from prefix_store.errors."""
        limits = await self.limits_of(tenant)
        try:
            await asyncio.to_thread(self.limiter.admit, tenant, request_id, limits, cost)
        except StoreUnavailableError:
            self.unguarded += 1
            log.warning("Redis is unreachable: request %s of tenant %s admitted without its tenant's limits",
                        request_id, tenant)
            return
        self._leases[(tenant, request_id)] = time.monotonic()

    def release(self, tenant: str, request_id: str) -> None:
        """Give the slot back (in the background: this runs in `finally` blocks of requests
        that may be being cancelled, where an await would be cancelled too)."""
        if self._leases.pop((tenant, request_id), None) is None:
            return
        future = asyncio.get_running_loop().run_in_executor(None, self.limiter.release, tenant, request_id)
        future.add_done_callback(_log_failure)

    async def run_renewals(self) -> None:
        """Until cancelled: renew the leases held, every lease_s / 3 seconds."""
        while True:
            await asyncio.sleep(self.limiter.lease_s / 3)
            too_old = time.monotonic() - self.max_hold_s
            for lease in [k for k, t in self._leases.items() if t < too_old]:
                del self._leases[lease]  # never released (a bug): let it expire
            held = list(self._leases)
            if not held:
                continue
            try:
                await asyncio.to_thread(self.limiter.renew, held)
            except StoreUnavailableError:
                log.warning("Redis is unreachable: %d request leases not renewed", len(held))


def _log_failure(future: asyncio.Future) -> None:
    if future.cancelled():
        return
    error = future.exception()
    if error is not None and not isinstance(error, StoreUnavailableError):  # unreachable: the lease expires
        log.error("releasing a request's slot failed: %r", error)
