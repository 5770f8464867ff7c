"""The store on a Redis Cluster whose nodes fail: a write is acknowledged only once a replica
holds it (WAIT), so a master killed during uploads loses none that were acknowledged.

This module starts its own cluster (six redis-servers): it freezes and kills nodes.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from redis.crc import key_slot

from prefix_store import NotReplicatedError, PrefixStore, StoreUnavailableError
from prefix_store.job_queue import JobQueue
from tests.prefix_store.helpers import FINGERPRINT, make_kv, unique_namespace, wait_until
from prefix_store.redis_cluster import NodeProcess, RedisClusterProcesses


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterProcesses]:
    with RedisClusterProcesses() as c:
        yield c


def tenants(cluster: RedisClusterProcesses, store: PrefixStore, master: NodeProcess, count: int,
            on_master: bool) -> list[str]:
    """`count` tenant ids whose keys live on `master` (or, on_master=False, elsewhere)."""
    ranges = cluster.slots_of(master)
    found = []
    for i in range(10_000):
        slot = key_slot(store.keys.prefixes(f"t{i}").encode())
        if any(start <= slot <= end for start, end in ranges) == on_master:
            found.append(f"t{i}")
            if len(found) == count:
                return found
    raise RuntimeError("not enough tenant ids found")


def test_a_write_waits_for_a_replica_and_is_refused_without_one(cluster):
    store = PrefixStore(cluster.url, namespace=unique_namespace(), wait_replicas=1, wait_timeout_ms=200)
    queue = JobQueue(cluster.url, namespace=store.keys.namespace, wait_replicas=1, wait_timeout_ms=200)
    try:
        master = cluster.master_of(queue.stream)  # a tenant on the same master as the job queue
        tenant = tenants(cluster, store, master, 1, on_master=True)[0]
        replica = cluster.replica_of(master)
        store.put(tenant, "before", make_kv(0), model_fingerprint=FINGERPRINT)
        with replica.client() as c:  # acknowledged: the replica has it already
            c.execute_command("READONLY")
            assert c.hget(store.keys.prefixes(tenant), "before") is not None

        os.kill(replica.proc.pid, signal.SIGSTOP)  # the replica stops reading its master's stream
        try:
            with pytest.raises(NotReplicatedError, match=r"reached 0 of the 1 Redis replica\(s\) required within 200 ms"):
                store.put(tenant, "frozen", make_kv(1), model_fingerprint=FINGERPRINT)
            with pytest.raises(NotReplicatedError):
                queue.submit(tenant, "ada", {"steps": 1})
        finally:
            os.kill(replica.proc.pid, signal.SIGCONT)
        # the replica catches up: the write is repeated and acknowledged
        record, _ = store.put(tenant, "frozen", make_kv(1), model_fingerprint=FINGERPRINT)
        with replica.client() as c:
            c.execute_command("READONLY")
            assert c.hget(store.keys.prefixes(tenant), "frozen") is not None
        assert store.get(tenant, "frozen")[0].version == record.version
    finally:
        store.close()
        queue.close()


@dataclass(frozen=True)
class Upload:
    tenant: str
    prefix_id: str
    seed: int
    version: str


def test_a_master_failover_during_uploads_loses_no_acknowledged_upload(cluster):
    namespace = unique_namespace()
    store = PrefixStore(cluster.url, namespace=namespace, wait_replicas=1, wait_timeout_ms=300)
    events_seen: list = []
    subscription = store.subscribe(events_seen.append)
    # the master we kill: the one this namespace's event channel hashes to, so the event
    # subscription has to move too; half the tenants live there, half elsewhere
    victim = cluster.master_of(store.keys.events())
    doomed = tenants(cluster, store, victim, 3, on_master=True)
    everyone = doomed + tenants(cluster, store, victim, 3, on_master=False)

    acked: list[Upload] = []
    refused = {"unavailable": 0, "not_replicated": 0}
    stop = threading.Event()

    def upload_loop() -> None:
        seed = 0
        deadline = time.monotonic() + 120  # bounded, whatever happens
        while not stop.is_set() and time.monotonic() < deadline and seed < 5000:
            tenant = everyone[seed % len(everyone)]
            prefix_id = f"p{seed % 4}"
            try:
                record, _ = store.put(tenant, prefix_id, make_kv(seed), model_fingerprint=FINGERPRINT)
                acked.append(Upload(tenant, prefix_id, seed, record.version))
            except NotReplicatedError:
                refused["not_replicated"] += 1
            except StoreUnavailableError:
                refused["unavailable"] += 1
            seed += 1

    thread = threading.Thread(target=upload_loop)
    thread.start()
    try:
        assert wait_until(lambda: len(acked) >= 30, timeout=30), refused
        before_kill = len(acked)
        victim.kill()
        promoted = cluster.wait_promoted(store.keys.events(), victim)
        cluster.restart(victim)  # it comes back as the promoted master's replica
        cluster.wait_healthy()
        assert wait_until(lambda: len(acked) >= before_kill + 60, timeout=60), refused
    finally:
        stop.set()
        thread.join()

    doomed_acks_after = [u for u in acked[before_kill:] if u.tenant in doomed]
    assert doomed_acks_after, "no upload to the failed-over master was acknowledged after the failover"
    assert promoted is not victim and cluster.role(victim) == "slave"
    # every acknowledged upload is readable, bit for bit...
    for u in acked:
        kv = store.get_version(u.tenant, u.prefix_id, u.version)
        assert kv is not None, f"acknowledged upload lost: {u}\n{cluster.describe()}"
        assert torch.equal(kv, make_kv(u.seed))
    # ...and the last acknowledged version of each id is the current one
    last = {(u.tenant, u.prefix_id): u.version for u in acked}
    for (tenant, prefix_id), version in last.items():
        assert store.get_record(tenant, prefix_id).version == version
    print(f"{len(acked)} uploads acknowledged, refused during the failover: {refused}")

    # the event subscription moved to a live node: events flow again
    try:
        events_seen.clear()
        # pub/sub keeps nothing for a subscriber that is away: publish once it is subscribed again
        assert wait_until(lambda: subscription.ready, timeout=30)
        store.put(doomed[0], "after-failover", make_kv(9999), model_fingerprint=FINGERPRINT)
        assert wait_until(lambda: any(e.prefix_id == "after-failover" for e in events_seen), timeout=30)
    finally:
        subscription.close()
        store.close()
