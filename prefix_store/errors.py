"""The store's errors: each says what is wrong and, where it can, what to change."""

from __future__ import annotations


class StoreUnavailableError(RuntimeError):
    """Redis cannot be reached (refused, timed out, loading). The API maps it to 503."""


class NotReplicatedError(StoreUnavailableError):
    """A write was not confirmed on the required number of Redis replicas in time (or was
    lost in a failover before it was). Nothing was acknowledged; repeating the write is safe.
    The API maps it to 503 with this message."""


class StoreIntegrityError(RuntimeError):
    """Stored data contradicts itself (a tensor missing or not matching its version hash).

    The store never produces this state itself; it means keys were changed behind its back
    or evicted (run Redis with `maxmemory-policy noeviction`).
    """


class TenantExistsError(ValueError):
    """create_tenant() for a tenant id that is already taken (or still being deleted)."""


class TenantDeletedError(RuntimeError):
    """A write into a tenant that was deleted (or deleted and created again since the
    writer looked it up): refused, so nothing reappears under a re-created name."""


class QuotaExceededError(RuntimeError):
    """A write that would take a tenant over its storage quota (bytes or prefix count);
    nothing was written. The message names the numbers."""


class RateLimitedError(RuntimeError):
    """A tenant is at its queue cap or out of tokens: retry after `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class OverLimitError(ValueError):
    """A request larger than its tenant's limits could ever admit (more tokens than its
    bucket holds): retrying cannot help."""
