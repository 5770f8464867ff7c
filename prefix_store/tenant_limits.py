"""What one tenant may use: its queue cap and token rate (checked per request, on every
replica together, by rate_limits.py) and its storage quota (checked by PrefixStore.put).

The admin stores per-tenant overrides with the tenant (`TenantDirectory.set_limits`); the
fields not overridden take the server's defaults (Settings `tenant_*`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace


@dataclass(frozen=True)
class TenantLimits:
    max_concurrent_requests: int = 256  # requests queued or running at once, all replicas together
    tokens_per_minute: int = 0  # prompt + max_tokens of the requests admitted; 0 = no rate limit
    burst_tokens: int = 0  # most tokens admitted at once after an idle spell; 0 = a minute's worth
    max_storage_bytes: int = 1 << 30  # bytes of prefix tensors stored (user prefixes included)
    max_prefixes: int = 10_000  # prefixes stored (user prefixes included)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{f.name} must be a non-negative integer, got {value!r}")
        if self.max_concurrent_requests < 1:
            raise ValueError(f"max_concurrent_requests must be at least 1, got {self.max_concurrent_requests}")

    @property
    def bucket_tokens(self) -> int:
        """The token bucket's size: burst_tokens, or a minute's worth."""
        return self.burst_tokens or self.tokens_per_minute

    def overridden(self, overrides: dict | None) -> "TenantLimits":
        """These limits with the fields named in `overrides` replaced (unknown names refused)."""
        if not overrides:
            return self
        unknown = set(overrides) - set(field_names())
        if unknown:
            raise ValueError(f"unknown tenant limits {sorted(unknown)}; known: {field_names()}")
        return replace(self, **overrides)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def field_names() -> list[str]:
    return [f.name for f in fields(TenantLimits)]


@dataclass(frozen=True)
class StorageUsage:
    """What a tenant stores now: prefix tensor bytes and prefix count."""

    bytes: int = 0
    prefixes: int = 0
