"""What a Redis Cluster and WAIT cost the prefix store, and what a master failover does to uploads.

    .venv/bin/python bench/cluster_bench.py            # ~1 minute; writes bench/results/cluster_bench.json

Starts its own redis-server (one) and Redis Cluster (three masters, one replica each, all on
127.0.0.1), and times PrefixStore.put / get of SmolLM2-135M-shaped prefixes (30 layers, 3
KV heads, head dim 64, float32) in the same process, rounds interleaved:
  - one Redis, no WAIT (the default of `serve --redis-url redis://...`)
  - the cluster, no WAIT
  - the cluster, WAIT for 1 replica (the default of `serve --redis-url redis+cluster://...`)
Then a failover: uploads run while the master of a third of the tenants is SIGKILLed; its
replica is promoted, the old master restarts as a replica. It counts acknowledged uploads,
refused ones, and acknowledged ones missing afterwards (the promise: none), and measures how
long uploads to the failed master's tenants were refused.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from pathlib import Path

import torch
from redis.crc import key_slot

from prefix_store import NotReplicatedError, PrefixStore, RedisServer, StoreUnavailableError
from prefix_store.redis_cluster import RedisClusterProcesses

LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64  # SmolLM2-135M
RESULTS = Path(__file__).parent / "results" / "cluster_bench.json"


def prefix(plen: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(LAYERS, 2, KV_HEADS, plen, HEAD_DIM, generator=g)


def time_puts(store: PrefixStore, plen: int, count: int, seed0: int) -> list[float]:
    kvs = [prefix(plen, seed0 + i) for i in range(count)]  # built before timing
    out = []
    for i, kv in enumerate(kvs):
        start = time.perf_counter()
        store.put(f"bench{i % 16}", f"p{plen}", kv, model_fingerprint="bench")
        out.append(time.perf_counter() - start)
    return out


def time_gets(store: PrefixStore, plen: int, count: int) -> list[float]:
    out = []
    for i in range(count):
        start = time.perf_counter()
        assert store.get(f"bench{i % 16}", f"p{plen}") is not None
        out.append(time.perf_counter() - start)
    return out


def ms(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return round(1000 * xs[min(len(xs) - 1, int(q * len(xs)))], 3)


def latency(stores: dict[str, PrefixStore], plen: int, count: int, rounds: int) -> dict:
    puts = {name: [] for name in stores}
    gets = {name: [] for name in stores}
    for r in range(rounds):
        for name, store in stores.items():
            puts[name] += time_puts(store, plen, count, seed0=1000 * r)
            gets[name] += time_gets(store, plen, count)
    base_put = statistics.median(puts["one Redis"])
    base_get = statistics.median(gets["one Redis"])
    return {name: {"put_p50_ms": ms(puts[name], 0.5), "put_p99_ms": ms(puts[name], 0.99),
                   "get_p50_ms": ms(gets[name], 0.5),
                   "put_p50_vs_one_redis": round(statistics.median(puts[name]) / base_put, 2),
                   "get_p50_vs_one_redis": round(statistics.median(gets[name]) / base_get, 2)}
            for name in stores}


def failover(cluster: RedisClusterProcesses, uploads_after: int) -> dict:
    store = PrefixStore(cluster.url, namespace="failover", wait_replicas=1, wait_timeout_ms=300)
    victim = cluster.master_of(store.keys.events())
    ranges = cluster.slots_of(victim)
    tenants = [f"t{i}" for i in range(12)]
    doomed = {t for t in tenants if any(a <= key_slot(store.keys.prefixes(t).encode()) <= b for a, b in ranges)}
    acked: list[tuple[str, str, int, str, float]] = []
    refused = {"unavailable": 0, "not_replicated": 0}
    stop = threading.Event()

    def loop() -> None:
        seed, deadline = 0, time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline:
            tenant = tenants[seed % len(tenants)]
            try:
                record, _ = store.put(tenant, f"p{seed % 4}", prefix(16, seed), model_fingerprint="bench")
                acked.append((tenant, record.prefix_id, seed, record.version, time.monotonic()))
            except NotReplicatedError:
                refused["not_replicated"] += 1
            except StoreUnavailableError:
                refused["unavailable"] += 1
            except Exception as e:  # not what the store promises: report it, keep going
                name = f"unexpected {type(e).__name__}: {e}"[:200]
                refused[name] = refused.get(name, 0) + 1
            seed += 1

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        while len(acked) < 50:
            time.sleep(0.01)
        killed_at = time.monotonic()
        victim.kill()
        cluster.wait_promoted(store.keys.events(), victim)
        promoted_s = time.monotonic() - killed_at
        cluster.restart(victim)
        cluster.wait_healthy()
        healthy_s = time.monotonic() - killed_at
        target = len(acked) + uploads_after
        while len(acked) < target and thread.is_alive():
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join()
    lost = [a for a in acked if store.get_version(a[0], a[1], a[3]) is None]
    before = [a[4] for a in acked if a[0] in doomed and a[4] < killed_at]
    after = [a[4] for a in acked if a[0] in doomed and a[4] > killed_at]
    store.close()
    return {"acknowledged": len(acked), "refused": refused, "acknowledged_then_lost": len(lost),
            "tenants_on_failed_master": f"{len(doomed)} of {len(tenants)}",
            "replica_promoted_after_s": round(promoted_s, 2),
            "old_master_back_as_replica_after_s": round(healthy_s, 2),
            "uploads_to_failed_master_refused_for_s": round(min(after) - max(before), 2) if before and after else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=40, help="puts (and gets) per system, size and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with RedisServer() as single, RedisClusterProcesses() as cluster:
        stores = {"one Redis": PrefixStore(single.url, namespace="lat"),
                  "cluster": PrefixStore(cluster.url, namespace="lat"),
                  "cluster + WAIT 1 replica": PrefixStore(cluster.url, namespace="latw", wait_replicas=1)}
        results = {"machine": f"{platform.machine()}, {platform.system()} (2 CPU cores shared with other work)",
                   "prefix_shape": [LAYERS, 2, KV_HEADS, "P", HEAD_DIM],
                   "latency": {f"P={plen} ({LAYERS * 2 * KV_HEADS * plen * HEAD_DIM * 4 / 1e6:.2f} MB)":
                               latency(stores, plen, args.count, args.rounds) for plen in (16, 128)}}
        for store in stores.values():
            store.close()
        results["failover"] = failover(cluster, uploads_after=100)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
