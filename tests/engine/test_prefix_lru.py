"""PrefixLRU, the engine process's host copies of prefixes: a tensor is kept by key within
the byte budget, least recently used dropped first (never the one just added, never a
pinned one), every dropped key reported once, and a key it no longer holds asked for again."""

from __future__ import annotations

import torch

from server.engine.engine_core import PrefixPayload
from server.engine.prefix_lru import PrefixLRU
from server.prefix import ClassifierHead, ModelSpec, PrefixRef

SPEC = ModelSpec(num_layers=2, num_kv_heads=2, head_dim=4, fingerprint="f", max_model_len=64)
ONE = 2 * 2 * 2 * 3 * 4 * 4  # bytes of one 3-token float32 prefix


def payload(name: str, version: str = "v1", plen: int = 3, kv: bool = True) -> PrefixPayload:
    ref = PrefixRef("acme", name, version)
    return PrefixPayload((ref,), (ref,), torch.ones(SPEC.kv_shape(plen)) if kv else None)


def key(name: str, version: str = "v1") -> tuple:
    return (PrefixRef("acme", name, version),)


def test_a_kept_prefix_is_found_by_key_alone_and_an_unknown_one_is_asked_for():
    lru = PrefixLRU(SPEC, 10 * ONE)
    made = lru.get(payload("a"))
    assert made.key == key("a") and made.spec is SPEC and lru.nbytes == ONE == made.nbytes
    assert lru.get(payload("a", kv=False)) is made
    assert lru.get(payload("b", kv=False)) is None
    assert len(lru) == 1 and key("b") not in lru and lru.take_forgotten() == []


def test_least_recently_used_goes_first_and_each_dropped_key_is_reported_once():
    lru = PrefixLRU(SPEC, 2 * ONE)
    lru.get(payload("a"))
    lru.get(payload("b"))
    lru.get(payload("a", kv=False))  # a is now the most recently used
    lru.get(payload("c"))
    assert lru.take_forgotten() == [key("b")]
    assert lru.take_forgotten() == []
    assert key("a") in lru and key("c") in lru and lru.nbytes == 2 * ONE


def test_the_prefix_just_added_and_pinned_ones_stay_over_the_budget():
    lru = PrefixLRU(SPEC, ONE)
    lru.get(payload("a"))
    lru.get(payload("b"))
    big = lru.get(payload("big", plen=9), pinned={key("b")})
    assert big.length == 9 and key("big") in lru and key("b") in lru
    assert lru.take_forgotten() == [key("a")] and lru.nbytes == 4 * ONE
    lru.get(payload("c"))  # nothing pinned now: everything but c goes
    assert lru.take_forgotten() == [key("b"), key("big")] and lru.nbytes == ONE


def test_stale_versions_are_forgotten_unless_pinned():
    lru = PrefixLRU(SPEC, 10 * ONE)
    for name, version in [("p", "v1"), ("p", "v2"), ("q", "v1"), ("p", "v3")]:
        lru.get(payload(name, version))
    lru.forget_stale("acme", "p", "v3", pinned={key("p", "v2")})
    assert lru.take_forgotten() == [key("p", "v1")]
    lru.forget_stale("acme", "p", None)  # the prefix was deleted: every version
    assert lru.take_forgotten() == [key("p", "v2"), key("p", "v3")]
    assert len(lru) == 1 and lru.nbytes == ONE


def test_an_anonymous_prefix_keeps_the_key_the_api_knows_it_by_and_a_head_counts():
    lru = PrefixLRU(SPEC, 10 * ONE)
    anon = lru.get(PrefixPayload(("anonymous", 77), (), torch.ones(SPEC.kv_shape(3))))
    assert anon.key == ("anonymous", 77) and lru.get(PrefixPayload(("anonymous", 77), (), None)) is anon
    head = ClassifierHead(torch.ones(3, 8), torch.ones(3))
    ref = PrefixRef("acme", "h", "v1")
    with_head = lru.get(PrefixPayload((ref,), (ref,), torch.ones(SPEC.kv_shape(3)), head))
    assert with_head.head is head and lru.nbytes == 2 * ONE + head.nbytes
