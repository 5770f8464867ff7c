"""What a tenant stores (bytes of prefix tensors, prefix count), kept beside its index and
changed in the same MULTI/EXEC as the index, so it never drifts from it; and the storage
quota check of a write.

These run inside PrefixStore's WATCH transactions (the tenant's index is watched, and every
change of the usage comes with a change of the index, so a concurrent writer makes the
transaction retry). A tenant stored before usage was counted is counted from its index once.
"""

from __future__ import annotations

import redis

from prefix_store.errors import QuotaExceededError
from prefix_store.keys import Keys
from prefix_store.record import PrefixRecord
from prefix_store.tenant_limits import StorageUsage, TenantLimits


def read_usage(client: redis.Redis | redis.client.Pipeline, keys: Keys, tenant: str) -> StorageUsage:
    raw_bytes, raw_count = client.hmget(keys.usage(tenant), "bytes", "prefixes")
    if raw_bytes is None:  # never counted: count the index once
        records = [PrefixRecord.from_json(v) for v in client.hvals(keys.prefixes(tenant))]
        return StorageUsage(sum(r.bytes for r in records), len(records))
    return StorageUsage(int(raw_bytes), int(raw_count or 0))


def usage_after_put(usage: StorageUsage, old: PrefixRecord | None, new_bytes: int) -> StorageUsage:
    if old is None:
        return StorageUsage(usage.bytes + new_bytes, usage.prefixes + 1)
    return StorageUsage(usage.bytes - old.bytes + new_bytes, usage.prefixes)


def usage_after_delete(usage: StorageUsage, old: PrefixRecord) -> StorageUsage:
    return StorageUsage(max(0, usage.bytes - old.bytes), max(0, usage.prefixes - 1))


def check_quota(tenant: str, prefix_id: str, new_bytes: int, before: StorageUsage, after: StorageUsage,
                limits: TenantLimits) -> None:
    """Raise QuotaExceededError if the write grows the usage past the quota (a write that
    does not grow it, such as a smaller replacement, is allowed even above a lowered quota)."""
    if after.prefixes > before.prefixes and after.prefixes > limits.max_prefixes:
        raise QuotaExceededError(
            f"tenant {tenant!r} stores {before.prefixes} prefixes; its quota is {limits.max_prefixes}: prefix "
            f"{prefix_id!r} is not stored (delete prefixes, or ask the admin to raise max_prefixes)")
    if after.bytes > before.bytes and after.bytes > limits.max_storage_bytes:
        raise QuotaExceededError(
            f"prefix {prefix_id!r} ({new_bytes} bytes) would take tenant {tenant!r} to {after.bytes} bytes stored; "
            f"its quota is {limits.max_storage_bytes} bytes ({before.bytes} stored in {before.prefixes} prefixes): "
            "it is not stored (delete prefixes, or ask the admin to raise max_storage_bytes)")


def write_usage(pipe: redis.client.Pipeline, keys: Keys, tenant: str, usage: StorageUsage) -> None:
    pipe.hset(keys.usage(tenant), mapping={"bytes": usage.bytes, "prefixes": usage.prefixes})
