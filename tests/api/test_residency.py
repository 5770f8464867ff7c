"""The host-memory tier and the resolver, as pure logic (a dict-backed stand-in for the
store; the real store is exercised end to end in the other api tests)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from prefix_store import PrefixEvent, PrefixRecord, StoreUnavailableError
from server.api.host_prefixes import HostPrefixes
from server.api.prefix_resolver import PrefixNotFound, PrefixResolver, PrefixUnavailable
from server.prefix import ModelMismatchError, ModelSpec, Prefix, PrefixRef

SHAPE = (2, 2, 2, 4, 8)  # one prefix: 2*2*2*4*8 float32 = 1 KiB
SPEC = ModelSpec(num_layers=2, num_kv_heads=2, head_dim=8, fingerprint="fp", max_model_len=256)


def prefix(tenant: str, pid: str, version: str, fill: float = 0.0) -> Prefix:
    return Prefix(kv=torch.full(SHAPE, fill), spec=SPEC, refs=(PrefixRef(tenant, pid, version),))


class DictStore:
    """get_record/get_version over a dict; `down` makes every call fail like Redis away."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], PrefixRecord] = {}
        self.tensors: dict[tuple[str, str, str], torch.Tensor] = {}
        self.down = False
        self.tensor_reads = 0

    def put(self, tenant: str, pid: str, version: str, fill: float, fingerprint: str = "fp",
            shared: bool = False) -> None:
        self.records[(tenant, pid)] = PrefixRecord(tenant, pid, version, 4, 2, 2, 8, "float32", 1024, 0.0, "",
                                                   fingerprint, shared)
        self.tensors[(tenant, pid, version)] = torch.full(SHAPE, fill)

    def get_record(self, tenant: str, pid: str) -> PrefixRecord | None:
        if self.down:
            raise StoreUnavailableError("down")
        return self.records.get((tenant, pid))

    def get_version(self, tenant: str, pid: str, version: str) -> torch.Tensor | None:
        if self.down:
            raise StoreUnavailableError("down")
        self.tensor_reads += 1
        time.sleep(0.05)  # a slow transfer, so concurrent requests overlap
        return self.tensors.get((tenant, pid, version))

    def get_serving(self, record: PrefixRecord, dtype: torch.dtype | None) -> torch.Tensor | None:
        return self.get_version(record.tenant, record.prefix_id, record.version)  # no serving copies here

    def forget_verified(self) -> None:
        pass


def make_resolver(store: DictStore, capacity: int = 1 << 20) -> PrefixResolver:
    return PrefixResolver(store, lambda kv, refs: Prefix(kv=kv.clone(), spec=SPEC, refs=refs), HostPrefixes(capacity), "fp")


def test_lru_keeps_within_its_byte_budget_and_refreshes_on_use():
    cache = HostPrefixes(capacity_bytes=3 * 1024)
    a, b, c, d = (prefix("t", n, "v1") for n in "abcd")
    for p in (a, b, c):
        cache.put(p)
    assert cache.get(a.key) is a  # a is now the most recent
    cache.put(d)
    assert cache.get(b.key) is None  # b was the least recently used
    assert [cache.get(p.key) is p for p in (a, c, d)] == [True, True, True]
    assert cache.nbytes == 3 * 1024 and cache.evictions == 1
    cache.put(Prefix(kv=torch.zeros(2, 2, 2, 64, 8), spec=SPEC, refs=(PrefixRef("t", "huge", "v"),)))
    assert len(cache) == 3  # larger than the whole budget: not kept, nothing evicted for it


def test_drop_stale_removes_other_versions_and_compositions():
    cache = HostPrefixes(1 << 20)
    old, new, other = prefix("t", "a", "v1"), prefix("t", "a", "v2"), prefix("t", "b", "v1")
    both = Prefix(kv=torch.zeros(SHAPE), spec=SPEC, refs=old.refs + other.refs)
    for p in (old, new, other, both):
        cache.put(p)
    assert cache.drop_stale("t", "a", keep_version="v2") == 2
    assert cache.get(old.key) is None and cache.get(both.key) is None
    assert cache.get(new.key) is new and cache.get(other.key) is other
    assert cache.drop_stale("t", "a", keep_version=None) == 1  # a delete drops every version


def test_resolve_loads_once_then_serves_from_memory_and_composes_in_order():
    store = DictStore()
    store.put("t", "a", "v1", 1.0)
    store.put("t", "b", "v1", 2.0)
    resolver = make_resolver(store)

    async def run():
        results = await asyncio.gather(*(resolver.resolve("t", ["a"]) for _ in range(8)))
        composed = await resolver.resolve("t", ["a", "b"])
        return results, composed

    results, composed = asyncio.run(run())
    assert all(r is results[0] for r in results)
    assert store.tensor_reads == 2  # "a" once for 8 concurrent requests, then "b"
    assert [r.prefix_id for r in composed.refs] == ["a", "b"]
    assert composed.kv[:, :, :, :4].eq(1.0).all() and composed.kv[:, :, :, 4:].eq(2.0).all()


def test_new_version_is_loaded_and_store_outage_falls_back_to_resident_copy():
    store = DictStore()
    store.put("t", "a", "v1", 1.0)
    store.put("t", "cold", "v1", 3.0)
    resolver = make_resolver(store)
    first = asyncio.run(resolver.resolve("t", ["a"]))
    store.put("t", "a", "v2", 5.0)  # replaced, no event delivered: the version check still sees it
    second = asyncio.run(resolver.resolve("t", ["a"]))
    assert second.refs[0].version == "v2" and second.kv.eq(5.0).all() and first.kv.eq(1.0).all()
    store.down = True
    assert asyncio.run(resolver.resolve("t", ["a"])) is second  # the version last seen
    with pytest.raises(PrefixUnavailable, match="unreachable"):
        asyncio.run(resolver.resolve("t", ["cold"]))


def test_events_drop_stale_copies_so_an_outage_never_serves_them():
    store = DictStore()
    store.put("t", "a", "v1", 1.0)
    resolver = make_resolver(store)
    asyncio.run(resolver.resolve("t", ["a"]))
    resolver.on_event(PrefixEvent("delete", "t", "a", "v1"))
    store.down = True
    with pytest.raises(PrefixUnavailable):
        asyncio.run(resolver.resolve("t", ["a"]))


def test_unknown_shared_and_mismatched_prefixes():
    store = DictStore()
    store.put("admin", "house", "v1", 1.0, shared=True)
    store.put("admin", "private", "v1", 1.0)
    store.put("admin", "user:ann", "v1", 1.0, shared=True)
    store.put("t", "other-model", "v1", 1.0, fingerprint="zz")
    resolver = make_resolver(store)
    with pytest.raises(PrefixNotFound):
        asyncio.run(resolver.resolve("t", ["nope"]))
    with pytest.raises(PrefixNotFound):
        asyncio.run(resolver.resolve("t", ["house"]))  # the admin's, but not shared by that name
    assert asyncio.run(resolver.resolve("t", ["shared/house"])).refs[0].tenant == "admin"
    for unshared in ("shared/private", "shared/user:ann"):  # not marked shared; a user prefix never is
        with pytest.raises(PrefixNotFound):
            asyncio.run(resolver.resolve("t", [unshared]))
    resolver.shared_prefixes = False
    with pytest.raises(PrefixNotFound, match="turned off"):
        asyncio.run(resolver.resolve("t", ["shared/house"]))
    with pytest.raises(ModelMismatchError, match="fingerprint zz"):
        asyncio.run(resolver.resolve("t", ["other-model"]))


def test_cache_is_safe_to_drop_from_another_thread():
    cache = HostPrefixes(1 << 30)
    stop = threading.Event()

    def dropper():
        for _ in range(100_000):  # bounded; sleep(0) hands the GIL back so put() is not starved
            if stop.is_set():
                return
            cache.drop_stale("t", "p0", None)
            time.sleep(0)

    thread = threading.Thread(target=dropper)
    thread.start()
    try:
        for i in range(2000):
            cache.put(prefix("t", f"p{i % 5}", f"v{i}"))
    finally:
        stop.set()
        thread.join()
    assert cache.nbytes == sum(p.nbytes for p in cache._entries.values())


def test_an_unshared_admin_prefix_is_not_reached_through_the_outage_fallback():
    store = DictStore()
    store.put("admin", "private", "v1", 1.0)
    resolver = make_resolver(store)
    assert asyncio.run(resolver.resolve("admin", ["private"])).refs[0].version == "v1"  # resident now
    store.down = True
    assert asyncio.run(resolver.resolve("admin", ["private"])).refs[0].version == "v1"  # its owner keeps it
    with pytest.raises(PrefixUnavailable):
        asyncio.run(resolver.resolve("t", ["shared/private"]))


class CountingStore(DictStore):
    """Records how many tensor reads run at once, and the most ever."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self.now = self.most = 0

    def get_version(self, tenant: str, pid: str, version: str) -> torch.Tensor | None:
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            return super().get_version(tenant, pid, version)
        finally:
            with self._lock:
                self.now -= 1


def test_cold_loads_are_capped_and_a_resident_prefix_is_served_during_a_storm():
    store = CountingStore()
    for i in range(12):
        store.put("t", f"cold{i}", "v1", float(i))
    store.put("t", "warm", "v1", 99.0)
    resolver = PrefixResolver(store, lambda kv, refs: Prefix(kv=kv.clone(), spec=SPEC, refs=refs),
                              HostPrefixes(1 << 20), "fp", max_concurrent_loads=3)
    asyncio.run(resolver.resolve("t", ["warm"]))  # resident from now on

    async def run():
        storm = [asyncio.ensure_future(resolver.resolve("t", [f"cold{i}"])) for i in range(12)]
        await asyncio.sleep(0)
        warm = await resolver.resolve("t", ["warm"])
        reads_when_warm_served = store.tensor_reads
        cold = await asyncio.gather(*storm)
        return warm, reads_when_warm_served, cold

    warm, reads_when_warm_served, cold = asyncio.run(run())
    assert store.most == 3  # never more than the cap at once (12 were asked for together)
    assert warm.kv.eq(99.0).all() and reads_when_warm_served < 12  # served before the storm was through
    assert [p.kv[0, 0, 0, 0, 0].item() for p in cold] == [float(i) for i in range(12)]
    assert store.tensor_reads == 1 + 12
