"""Per-tenant limits in Redis: storage usage kept with the index and the quota checked in the
same transaction as the write (nothing half-written), limit overrides stored with the
tenant, and the admission script (queue cap and token bucket) shared by two limiters as by
two replicas."""

from __future__ import annotations

import threading
import time

import pytest

from prefix_store.errors import OverLimitError, QuotaExceededError, RateLimitedError
from prefix_store.rate_limits import RateLimiter
from prefix_store.tenant_limits import StorageUsage, TenantLimits
from tests.prefix_store.helpers import FINGERPRINT, make_kv, namespace_keys

KV_BYTES = 2 * 2 * 2 * 3 * 8 * 4  # make_kv(): [2, 2, 2, 3, 8] float32


def put(store, tenant, prefix_id, seed=0, plen=3, limits=None):
    return store.put(tenant, prefix_id, make_kv(seed, plen=plen), model_fingerprint=FINGERPRINT, limits=limits)


# ---- storage usage and quota

def test_usage_follows_puts_replacements_and_deletes(store):
    store.create_tenant("acme")
    assert store.storage_usage("acme") == StorageUsage(0, 0)
    put(store, "acme", "a")
    put(store, "acme", "b", seed=1)
    assert store.storage_usage("acme") == StorageUsage(2 * KV_BYTES, 2)
    put(store, "acme", "a", seed=2, plen=6)  # replaced by one twice as long
    assert store.storage_usage("acme") == StorageUsage(3 * KV_BYTES, 2)
    store.delete("acme", "b")
    assert store.storage_usage("acme") == StorageUsage(2 * KV_BYTES, 1)


def test_a_write_over_the_quota_is_refused_with_the_numbers_and_stores_nothing(store, raw, namespace):
    store.create_tenant("acme")
    limits = TenantLimits(max_storage_bytes=2 * KV_BYTES, max_prefixes=3)
    put(store, "acme", "a", limits=limits)
    put(store, "acme", "b", seed=1, limits=limits)
    keys_before = namespace_keys(raw, namespace)
    with pytest.raises(QuotaExceededError) as e:
        put(store, "acme", "c", seed=2, limits=limits)
    assert f"{3 * KV_BYTES} bytes" in str(e.value) and f"quota is {2 * KV_BYTES} bytes" in str(e.value)
    assert namespace_keys(raw, namespace) == keys_before  # no tensor, no record, no event
    assert [r.prefix_id for r in store.list("acme")] == ["a", "b"]
    assert store.storage_usage("acme") == StorageUsage(2 * KV_BYTES, 2)
    # a replacement of the same size stays within the quota; a larger one does not
    put(store, "acme", "a", seed=3, limits=limits)
    with pytest.raises(QuotaExceededError):
        put(store, "acme", "a", seed=4, plen=6, limits=limits)
    # another tenant has its own quota
    store.create_tenant("globex")
    put(store, "globex", "a", limits=limits)


def test_the_prefix_count_quota(store):
    store.create_tenant("acme")
    limits = TenantLimits(max_prefixes=2)
    put(store, "acme", "a", limits=limits)
    put(store, "acme", "b", limits=limits)
    with pytest.raises(QuotaExceededError, match="stores 2 prefixes; its quota is 2"):
        put(store, "acme", "c", limits=limits)
    put(store, "acme", "b", seed=5, limits=limits)  # replacing one is not a new prefix
    store.delete("acme", "a")
    put(store, "acme", "c", limits=limits)


def test_concurrent_writers_cannot_overshoot_the_quota(store):
    store.create_tenant("acme")
    limits = TenantLimits(max_prefixes=5)
    outcomes = []

    def writer(i: int) -> None:
        try:
            put(store, "acme", f"p{i}", seed=i, limits=limits)
            outcomes.append("stored")
        except QuotaExceededError:
            outcomes.append("refused")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert outcomes.count("stored") == 5 and outcomes.count("refused") == 7
    assert store.storage_usage("acme") == StorageUsage(5 * KV_BYTES, 5) and len(store.list("acme")) == 5


def test_usage_of_prefixes_stored_before_it_was_counted_is_counted_from_the_index(store, raw):
    store.create_tenant("acme")
    put(store, "acme", "a")
    put(store, "acme", "b", seed=1)
    raw.delete(store.keys.usage("acme"))  # as stored by a version without usage counters
    assert store.storage_usage("acme") == StorageUsage(2 * KV_BYTES, 2)
    with pytest.raises(QuotaExceededError):
        put(store, "acme", "c", limits=TenantLimits(max_prefixes=2))
    put(store, "acme", "c")
    assert store.storage_usage("acme") == StorageUsage(3 * KV_BYTES, 3)


def test_deleting_a_tenant_clears_its_usage(store):
    store.create_tenant("acme")
    put(store, "acme", "a")
    store.delete_tenant("acme")
    store.create_tenant("acme")
    assert store.storage_usage("acme") == StorageUsage(0, 0)


# ---- limits stored with the tenant

def test_limit_overrides_are_stored_with_the_tenant(store):
    store.create_tenant("acme")
    assert store.tenant_limit_overrides("acme") == {}
    assert store.set_tenant_limits("acme", {"tokens_per_minute": 600, "max_prefixes": 3})
    assert store.tenant_limit_overrides("acme") == {"tokens_per_minute": 600, "max_prefixes": 3}
    assert TenantLimits().overridden(store.tenant_limit_overrides("acme")).max_prefixes == 3
    key = store.rotate_key("acme")  # a key rotation keeps them
    assert store.tenant_for_key(key) == "acme" and store.tenant_limit_overrides("acme")["max_prefixes"] == 3
    with pytest.raises(ValueError, match="unknown tenant limits"):
        store.set_tenant_limits("acme", {"max_gpus": 1})
    with pytest.raises(ValueError, match="non-negative"):
        store.set_tenant_limits("acme", {"max_prefixes": -1})
    assert not store.set_tenant_limits("nobody", {"max_prefixes": 1})
    assert store.tenant_limit_overrides("nobody") is None
    store.delete_tenant("acme")
    store.create_tenant("acme")
    assert store.tenant_limit_overrides("acme") == {}  # a new tenant under the name starts with the defaults


# ---- admission: queue cap and token rate, shared by two limiters (two replicas)

@pytest.fixture()
def limiters(redis_server, namespace):
    a, b = RateLimiter(redis_server.url, namespace), RateLimiter(redis_server.url, namespace)
    yield a, b
    a.close()
    b.close()


def test_the_queue_cap_holds_across_replicas(limiters):
    a, b = limiters
    limits = TenantLimits(max_concurrent_requests=3)
    a.admit("acme", "r1", limits, 10)
    b.admit("acme", "r2", limits, 10)
    a.admit("acme", "r3", limits, 10)
    with pytest.raises(RateLimitedError, match="3 requests queued or running; its limit is 3") as e:
        b.admit("acme", "r4", limits, 10)
    assert e.value.retry_after_s > 0
    b.admit("globex", "r4", limits, 10)  # another tenant is not affected
    a.release("acme", "r2")
    b.admit("acme", "r4", limits, 10)
    assert a.in_flight("acme") == 3 and b.in_flight("globex") == 1


def test_the_token_rate_holds_across_replicas_and_says_when_to_retry(limiters):
    a, b = limiters
    limits = TenantLimits(tokens_per_minute=600, burst_tokens=100)  # 10 tokens a second, 100 at once
    a.admit("acme", "r1", limits, 60)
    with pytest.raises(RateLimitedError, match="tokens per minute") as e:
        b.admit("acme", "r2", limits, 60)  # 40 left (plus what refilled meanwhile)
    assert 1.0 < e.value.retry_after_s <= 2.0
    a.admit("acme", "r3", limits, 30)
    with pytest.raises(OverLimitError, match="at most 100 at once"):
        a.admit("acme", "r4", limits, 101)  # never admissible: a 400, not a 429
    unlimited = TenantLimits()
    for i in range(50):
        b.admit("globex", f"u{i}", unlimited, 10_000)


def test_a_replica_that_dies_gives_its_slots_back_when_the_leases_expire(redis_server, namespace):
    dying = RateLimiter(redis_server.url, namespace, lease_s=0.5)
    alive = RateLimiter(redis_server.url, namespace, lease_s=0.5)
    limits = TenantLimits(max_concurrent_requests=2)
    dying.admit("acme", "d1", limits, 1)
    alive.admit("acme", "a1", limits, 1)
    with pytest.raises(RateLimitedError):
        alive.admit("acme", "a2", limits, 1)
    for _ in range(4):  # the live replica renews its own lease; the dead one's expires
        time.sleep(0.25)
        alive.renew([("acme", "a1")])
    assert alive.in_flight("acme") == 1
    alive.admit("acme", "a2", limits, 1)
    dying.close()
    alive.close()
