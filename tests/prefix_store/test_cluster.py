"""Choosing a Redis Cluster by url, and the session's cluster doing what the store's and the
queue's tests (which run on it too, through `redis_backend`) take for granted: tenants spread
over the masters, each tenant's keys in one slot."""

from __future__ import annotations

import pytest
from redis.cluster import RedisCluster
from redis.crc import key_slot

from prefix_store import PrefixStore, StoreUnavailableError
from prefix_store.connection import is_cluster_url, make_client, redacted
from prefix_store.job_queue import JobQueue
from prefix_store.redis_process import free_port
from server.config import Settings
from tests.prefix_store.helpers import FINGERPRINT, make_kv, namespace_keys, unique_namespace


def test_the_url_chooses_the_client(redis_server, redis_cluster):
    assert is_cluster_url(redis_cluster.url) and not is_cluster_url(redis_server.url)
    single, cluster = make_client(redis_server.url), make_client(redis_cluster.url)
    try:
        assert not isinstance(single, RedisCluster) and isinstance(cluster, RedisCluster)
        assert len(cluster.get_primaries()) == 3
    finally:
        single.close()
        cluster.close()


def test_bad_or_unreachable_cluster_urls_say_why():
    with pytest.raises(ValueError, match="only database 0"):
        make_client("redis+cluster://127.0.0.1:7000/3")
    with pytest.raises(ValueError, match="expected host:port"):
        make_client("redis+cluster://127.0.0.1")
    port = free_port()
    with pytest.raises(StoreUnavailableError, match=f"Redis Cluster at redis\\+cluster://:\\*\\*\\*@127.0.0.1:{port}"):
        PrefixStore(f"redis+cluster://:secret@127.0.0.1:{port}")
    assert redacted(f"redis+cluster://:secret@127.0.0.1:{port},127.0.0.1:1") == \
        f"redis+cluster://:***@127.0.0.1:{port},127.0.0.1:1"


def test_writes_wait_for_one_replica_by_default_on_a_cluster_only():
    assert Settings().wait_replicas_for("redis+cluster://127.0.0.1:7000") == 1
    assert Settings().wait_replicas_for("redis://127.0.0.1:6379/0") == 0
    assert Settings(redis_wait_replicas=2).wait_replicas_for("redis+cluster://127.0.0.1:7000") == 2


def test_tenants_spread_over_the_masters_and_each_stays_in_one_slot(redis_cluster):
    namespace = unique_namespace()
    store = PrefixStore(redis_cluster.url, namespace=namespace, wait_replicas=1)
    queue = JobQueue(redis_cluster.url, namespace=namespace, wait_replicas=1)
    tenants = [f"tenant-{i}" for i in range(12)]
    try:
        for i, tenant in enumerate(tenants):
            store.create_tenant(tenant)
            store.put(tenant, "p", make_kv(i), model_fingerprint=FINGERPRINT)
            store.put(tenant, "p", make_kv(100 + i), model_fingerprint=FINGERPRINT)  # a replace: two tensors
            queue.submit(tenant, "ada", {"steps": 1})
        masters = {redis_cluster.master_of(store.keys.prefixes(t)).port for t in tenants}
        assert len(masters) >= 2, "every tenant on one master: the test would not exercise the cluster"
        raw = make_client(redis_cluster.url)
        try:
            keys = namespace_keys(raw, namespace)
        finally:
            raw.close()
        for tenant in tenants:
            mine = [k for k in keys if f"{{t:{tenant}}}".encode() in k]
            assert len(mine) >= 4  # index, incarnation, two tensors (and the sync key)
            assert len({key_slot(k) for k in mine}) == 1
        assert len({key_slot(k) for k in keys if b"{jobs}" in k}) == 1
        assert len({key_slot(k) for k in keys if b"{tenants}" in k}) == 1
        for i, tenant in enumerate(tenants):
            assert store.get(tenant, "p")[1].equal(make_kv(100 + i))
        assert store.delete_tenant(tenants[0])  # its keys on whichever node they live
        assert store.get(tenants[0], "p") is None
    finally:
        store.close()
        queue.close()
