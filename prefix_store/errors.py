"""The store's errors: each says what is wrong and, where it can, what to change."""

from __future__ import annotations


MAX_ID_IN_MESSAGE = 140  # characters of a client's id echoed in an error (a valid id has at most 128)


def shorten(value: object, limit: int = MAX_ID_IN_MESSAGE) -> str:
    """repr(value), cut to about `limit` characters: error messages never echo a huge id."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(str(value))} characters)"


class InvalidIdError(ValueError):
    """A tenant or prefix id that breaks its naming rule; raised before anything is written."""

    def __init__(self, kind: str, value: object, rule: str):
        self.kind = kind
        self.value = value
        self.rule = rule
        super().__init__(f"invalid {kind} {shorten(value)}: must match {rule}")


class StoreUnavailableError(RuntimeError):
    """Redis cannot be reached (refused, timed out, loading). The API maps it to 503."""


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
