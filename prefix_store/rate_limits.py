"""Per-tenant admission, enforced across replicas in Redis: a queue cap (requests queued or
running at once) and a token rate (a token bucket), both decided by one Lua script, so
that two replicas admitting at the same moment can never take a tenant past either.

    admit(tenant, request_id, limits, cost)   -> a lease on one of the tenant's slots
    release(tenant, request_id)               -> the slot is free again
    renew(leases)                             -> push back the expiry of leases still held

# NOTE: a slot is a member of the tenant's `inflight` sorted set scored by its expiry, so a
# replica that dies without releasing its slots gives them back within `lease_s` (a live
# replica renews the leases it holds every lease_s / 3). The bucket refills continuously at
# tokens_per_minute / 60 per second up to its size; a request costs its prompt tokens plus
# max_tokens, taken at admission (the bound of what it may produce). Both keys carry the
# tenant's hash tag: one slot in Redis Cluster, so the script is legal there. Time is the
# Redis server's (TIME), the same for every replica.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import redis

from prefix_store.connection import make_client, unavailable_as_error
from prefix_store.errors import OverLimitError, RateLimitedError
from prefix_store.keys import Keys
from prefix_store.tenant_limits import TenantLimits

# KEYS: inflight zset, bucket hash.  ARGV: request id, lease seconds, max concurrent,
# tokens per second (0 = no rate limit), bucket size, cost.
# Returns {1} admitted, or {0, "queue", in flight} / {0, "tokens", tokens left, seconds to wait}.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local in_flight = redis.call('ZCARD', KEYS[1])
if in_flight >= tonumber(ARGV[3]) then
  return {0, 'queue', tostring(in_flight), '0'}
end
local rate = tonumber(ARGV[4])
if rate > 0 then
  local size = tonumber(ARGV[5])
  local cost = tonumber(ARGV[6])
  local b = redis.call('HMGET', KEYS[2], 'tokens', 'ts')
  local tokens = tonumber(b[1]) or size
  local ts = tonumber(b[2]) or now
  tokens = math.min(size, tokens + math.max(0, now - ts) * rate)
  if tokens < cost then
    return {0, 'tokens', tostring(tokens), tostring((cost - tokens) / rate)}
  end
  redis.call('HSET', KEYS[2], 'tokens', tostring(tokens - cost), 'ts', tostring(now))
  redis.call('EXPIRE', KEYS[2], math.ceil(size / rate) + 60)
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2])) + 60)
return {1}
"""

# KEYS: inflight zset.  ARGV: lease seconds, request ids. Pushes back the expiry of the
# leases that are still there (XX: a lease that expired meanwhile is not revived).
_RENEW = """
local t = redis.call('TIME')
local expiry = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i])
end
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1])) + 60)
return #ARGV - 1
"""


class RateLimiter:
    """Synchronous (the API calls it through asyncio.to_thread); raises StoreUnavailableError
    when Redis cannot be reached."""

    def __init__(self, redis_url: str, namespace: str = "ps", lease_s: float = 30.0) -> None:
        self.redis_url = redis_url
        self.keys = Keys(namespace)
        self.lease_s = lease_s
        self._r = make_client(redis_url)
        self._admit = self._r.register_script(_ADMIT)
        self._renew = self._r.register_script(_RENEW)

    def admit(self, tenant: str, request_id: str, limits: TenantLimits, cost: int) -> None:
        """Take one of the tenant's slots for `request_id` and `cost` tokens from its bucket.

        Raises RateLimitedError (with the seconds to wait) at the queue cap or when the
        bucket holds fewer than `cost` tokens, OverLimitError when `cost` is more than the
        bucket can ever hold.
        """
        rate = limits.tokens_per_minute / 60.0
        if rate > 0 and cost > limits.bucket_tokens:
            raise OverLimitError(
                f"the request needs {cost} tokens (prompt + max_tokens); tenant {tenant!r} may use at most "
                f"{limits.bucket_tokens} at once ({limits.tokens_per_minute} tokens per minute): "
                "ask for fewer max_tokens or a shorter prompt")
        with unavailable_as_error(self.redis_url):
            result = self._admit(keys=[self.keys.inflight(tenant), self.keys.token_bucket(tenant)],
                                 args=[request_id, self.lease_s, limits.max_concurrent_requests, repr(rate),
                                       limits.bucket_tokens, cost])
        if int(result[0]) == 1:
            return
        reason = result[1].decode() if isinstance(result[1], bytes) else str(result[1])
        if reason == "queue":
            raise RateLimitedError(
                f"tenant {tenant!r} has {int(result[2])} requests queued or running; its limit is "
                f"{limits.max_concurrent_requests} (max_concurrent_requests): retry when one finishes", 1.0)
        left, wait = float(result[2]), float(result[3])
        raise RateLimitedError(
            f"tenant {tenant!r} is over its token rate of {limits.tokens_per_minute} tokens per minute: "
            f"this request needs {cost} tokens (prompt + max_tokens) and {int(left)} are available; "
            f"retry in {math.ceil(wait)} s", wait)

    def release(self, tenant: str, request_id: str) -> None:
        with unavailable_as_error(self.redis_url):
            self._r.zrem(self.keys.inflight(tenant), request_id)

    def renew(self, leases: Iterable[tuple[str, str]]) -> None:
        """Push back the expiry of the (tenant, request id) leases held, one script per tenant."""
        by_tenant: dict[str, list[str]] = {}
        for tenant, request_id in leases:
            by_tenant.setdefault(tenant, []).append(request_id)
        if not by_tenant:
            return
        with unavailable_as_error(self.redis_url):
            pipe = self._r.pipeline(transaction=False)
            for tenant, ids in by_tenant.items():
                self._renew(keys=[self.keys.inflight(tenant)], args=[self.lease_s, *ids], client=pipe)
            pipe.execute()

    def in_flight(self, tenant: str) -> int:
        """Slots the tenant holds now (expired leases not counted)."""
        with unavailable_as_error(self.redis_url):
            now = self._r.time()
            return int(self._r.zcount(self.keys.inflight(tenant), now[0] + now[1] / 1e6, "+inf"))

    def close(self) -> None:
        self._r.close()
