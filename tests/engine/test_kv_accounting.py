"""Blocks, refcounts, eviction order and preemption: nothing leaks, nothing deadlocks."""

from __future__ import annotations

import pytest
import torch

from server.engine.block_pool import BlockPool
from server.prefix import ModelSpec, Prefix, PrefixRef
from server.engine.device_prefixes import DevicePrefixes
from server.engine.sampling_params import SamplingParams
from tests.factories import make_engine, random_prefix, tiny_llama


SPEC = ModelSpec(num_layers=1, num_kv_heads=1, head_dim=4, fingerprint="test", max_model_len=256)


def _prefix(name: str, length: int) -> Prefix:
    return Prefix(kv=torch.zeros(1, 2, 1, length, 4), spec=SPEC, refs=(PrefixRef("t", name, "v1"),))


def test_block_pool_all_or_nothing_and_double_free():
    pool = BlockPool(4)
    assert pool.allocate(5) is None and pool.num_free == 4
    a = pool.allocate(3)
    assert a == [0, 1, 2] and pool.num_free == 1
    pool.free(a)
    with pytest.raises(RuntimeError, match="block 0 freed twice"):
        pool.free([0])


def test_prefix_cache_refcounts_and_lru_eviction_order():
    pool = BlockPool(6)
    written = []
    cache = DevicePrefixes(pool, block_size=4, write=lambda blocks, kv: written.append(list(blocks)))
    a, b, c = _prefix("a", 5), _prefix("b", 4), _prefix("c", 3)  # 2, 1, 1 blocks
    ea = cache.acquire(a)
    eb = cache.acquire(b)
    ec = cache.acquire(c)
    assert (ea.blocks, eb.blocks, ec.blocks) == ([0, 1], [2], [3])
    assert cache.acquire(a) is ea and ea.users == 2 and cache.hits == 1 and cache.misses == 3
    assert cache.lru_keys() == [b.key, c.key, a.key]
    for key in (b.key, c.key, a.key, a.key):
        cache.release(key)
    assert pool.num_free == 2
    # 3 blocks needed: b (least recently used) is enough; 4 needed: c goes too, a stays.
    assert cache.evict_until_free(3) and cache.lru_keys() == [c.key, a.key]
    assert cache.evict_until_free(4)
    assert cache.lru_keys() == [a.key] and cache.evictions == 2 and pool.num_free == 4
    # A prefix in use is never evicted.
    cache.acquire(a)
    assert not cache.evict_until_free(5) and a.key in cache
    assert not cache.drop(a.key)
    cache.release(a.key)
    with pytest.raises(RuntimeError, match="released more often"):
        cache.release(a.key)
    assert cache.drop(a.key) and pool.num_free == 6


def test_a_new_version_is_a_different_resident_prefix():
    pool = BlockPool(8)
    cache = DevicePrefixes(pool, block_size=4, write=lambda blocks, kv: None)
    old = Prefix(kv=torch.zeros(1, 2, 1, 4, 4), spec=SPEC, refs=(PrefixRef("t", "p", "v1"),))
    new = Prefix(kv=torch.ones(1, 2, 1, 4, 4), spec=SPEC, refs=(PrefixRef("t", "p", "v2"),))
    assert cache.acquire(old).blocks != cache.acquire(new).blocks
    assert len(cache) == 2


def _run_all(engine, requests):
    got = {}
    for rid, prompt, prefix, n in requests:
        engine.add_request(rid, prompt, SamplingParams(max_tokens=n, ignore_eos=True), prefix)
    while engine.has_unfinished():
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    return got


def test_tiny_pool_preempts_and_every_request_still_finishes_right():
    big = make_engine(tiny_llama(), num_blocks=256, block_size=4)
    prefixes = [random_prefix(big, n, seed=n) for n in (5, 9)]
    requests = [(f"r{i}", [3 + i, 8, 13, 21, 34][: 2 + i % 4], prefixes[i % 2] if i % 3 else None, 20 + i)
                for i in range(6)]
    want = _run_all(big, requests)

    small = make_engine(tiny_llama(), num_blocks=16, block_size=4)
    got = _run_all(small, requests)
    assert small.stats().preemptions > 0, "the pool was not small enough to force preemption"
    assert got == want
    assert small.kv.pool.num_free + small.kv.prefixes.num_blocks == 16
    assert all(e.users == 0 for e in map(small.kv.prefixes.get, small.kv.prefixes.lru_keys()))


def test_abort_frees_blocks_at_once_running_or_waiting():
    engine = make_engine(tiny_llama(), num_blocks=32, block_size=4, max_num_seqs=2)
    prefix = random_prefix(engine, 6, seed=2)
    for i in range(4):
        engine.add_request(f"r{i}", [5, 6, 7, 8, 9], SamplingParams(max_tokens=30), prefix)
    engine.step()
    assert len(engine.scheduler.running) == 2 and len(engine.scheduler.waiting) == 2
    assert engine.kv.prefixes.get(prefix.key).users == 2
    for i in range(4):
        (out,) = engine.abort(f"r{i}")
        assert out.finished and out.finish_reason.value == "abort"
    assert not engine.has_unfinished()
    assert engine.kv.prefixes.get(prefix.key).users == 0
    assert engine.kv.pool.num_free == 32 - engine.kv.prefixes.num_blocks
    assert engine.abort("r0") == []  # twice is harmless
    assert engine.step() == []


def test_prefix_evicted_when_unused_and_pool_needs_room():
    engine = make_engine(tiny_llama(), num_blocks=12, block_size=4)
    p1, p2 = random_prefix(engine, 8, seed=1), random_prefix(engine, 8, seed=2)
    engine.generate([[3, 4]], SamplingParams(max_tokens=2), [p1])
    engine.generate([[3, 4]], SamplingParams(max_tokens=2), [p2])
    assert engine.kv.prefixes.lru_keys() == [p1.key, p2.key]
    # needs 8 own blocks: only 8 are free, so nothing is evicted yet
    engine.generate([[3] * 20], SamplingParams(max_tokens=12), [None])
    assert len(engine.kv.prefixes) == 2
    # needs 10: p1 (least recently used) goes, p2 stays
    engine.generate([[3] * 28], SamplingParams(max_tokens=12), [None])
    assert engine.kv.prefixes.lru_keys() == [p2.key]
    assert engine.stats().prefix_evictions == 1


def test_drop_stale_evicts_other_versions_unless_in_use():
    pool = BlockPool(8)
    cache = DevicePrefixes(pool, block_size=4, write=lambda blocks, kv: None)
    v1 = Prefix(kv=torch.zeros(1, 2, 1, 4, 4), spec=SPEC, refs=(PrefixRef("t", "p", "v1"),))
    v2 = Prefix(kv=torch.zeros(1, 2, 1, 4, 4), spec=SPEC, refs=(PrefixRef("t", "p", "v2"),))
    pair = Prefix(kv=torch.zeros(1, 2, 1, 8, 4), spec=SPEC, refs=(PrefixRef("t", "task", "a"), PrefixRef("t", "p", "v1")))
    other = Prefix(kv=torch.zeros(1, 2, 1, 4, 4), spec=SPEC, refs=(PrefixRef("u", "p", "v1"),))
    for p in (v1, v2, pair, other):
        cache.acquire(p)
        cache.release(p.key)
    cache.acquire(pair)  # in use: survives until released
    assert cache.drop_stale("t", "p", keep_version="v2") == 1
    assert cache.lru_keys() == [v2.key, other.key, pair.key]
    cache.release(pair.key)
    assert cache.drop_stale("t", "p", keep_version=None) == 2
    assert cache.lru_keys() == [other.key]


def test_anonymous_prefixes_never_share_a_residency_key():
    """Keyed by id(tensor), a new prefix could hit the blocks of a freed one (ids are reused)."""
    engine = make_engine(tiny_llama(), num_blocks=64)
    keys = [random_prefix(engine, 4 + i % 3, seed=i).key for i in range(200)]  # each freed at once
    assert len(set(keys)) == 200
