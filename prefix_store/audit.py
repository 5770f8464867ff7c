"""The audit log of admin actions: who did what, when, and how it ended, in a capped Redis stream.

    ps:audit    stream  one entry {entry: AuditEntry JSON} per action, oldest trimmed past
                        `max_entries` (XADD MAXLEN ~: Redis trims whole nodes, so a few more stay)

Entries are written before the action's response is sent; on a Redis persisting with
`appendfsync always` (the one `serve` owns) an acknowledged admin action is on disk with its
entry. Nothing secret is stored: a key is named by the first 12 hex digits of its sha256.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

from prefix_store.connection import make_client, unavailable_as_error

DEFAULT_MAX_ENTRIES = 100_000


@dataclass(frozen=True)
class AuditEntry:
    time: float  # seconds since the epoch
    actor: str  # "admin" (the admin key), a tenant id, or "" when no valid key was given
    key_id: str  # first 12 hex digits of sha256(the key presented); "" without a key
    action: str  # method and route template: "DELETE /v1/admin/tenants/{tenant_id}"
    target: str  # what it acted on (a tenant id, a prefix id); "" for none
    status: int  # the HTTP status of the answer
    client: str  # the client's address
    id: str = ""  # the stream entry id (set when read back): a cursor for `before`

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if k != "id"}, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str, entry_id: str = "") -> "AuditEntry":
        return replace(cls(**json.loads(raw)), id=entry_id)


class AuditLog:
    def __init__(self, redis_url: str, namespace: str = "ps", max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.redis_url = redis_url
        self.key = f"{namespace}:audit"
        self.max_entries = max_entries
        self._r = make_client(redis_url)

    def append(self, entry: AuditEntry) -> str:
        """Store the entry; its id. Raises StoreUnavailableError when Redis is unreachable."""
        with unavailable_as_error(self.redis_url):
            entry_id = self._r.xadd(self.key, {"entry": entry.to_json()}, maxlen=self.max_entries,
                                    approximate=True)
        return entry_id.decode()

    def read(self, count: int = 100, before: str | None = None) -> list[AuditEntry]:
        """Up to `count` entries, newest first; with `before` (an entry id), those older than it."""
        high = f"({before}" if before else "+"
        with unavailable_as_error(self.redis_url):
            rows = self._r.xrevrange(self.key, max=high, min="-", count=count)
        return [AuditEntry.from_json(fields[b"entry"], entry_id.decode()) for entry_id, fields in rows]

    def close(self) -> None:
        self._r.close()
