"""The store's errors: each says what is wrong and, where it can, what to change."""

from __future__ import annotations


class InvalidIdError(ValueError):
    """A tenant or prefix id that breaks its naming rule; raised before anything is written."""

    def __init__(self, kind: str, value: object, rule: str):
        self.kind = kind
        self.value = value
        self.rule = rule
        super().__init__(f"invalid {kind} {value!r}: must match {rule}")


class StoreUnavailableError(RuntimeError):
    """Redis cannot be reached (refused, timed out, loading). The API maps it to 503."""


class StoreIntegrityError(RuntimeError):
    """Stored data contradicts itself (a tensor missing or not matching its version hash).

    The store never produces this state itself; it means keys were changed behind its back
    or evicted (run Redis with `maxmemory-policy noeviction`).
    """


class TenantExistsError(ValueError):
    """create_tenant() for a tenant id that is already taken."""
