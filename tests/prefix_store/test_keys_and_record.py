"""Id rules, key names and hash slots, record serialization (pure logic, plus one real put)."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from prefix_store.keys import Keys, hash_tag
from server.prefix.ids import PREFIX_RULE, TENANT_RULE, InvalidIdError, validate_prefix_id, validate_tenant
from prefix_store.record import PrefixEvent, PrefixRecord
from server.prefix import PrefixRef
from tests.prefix_store.helpers import FINGERPRINT, make_kv, namespace_keys


@pytest.mark.parametrize("prefix_id", ["support-bot", "user:alice", "user:a.b_c-1", "A", "x" * 128])
def test_valid_prefix_ids(prefix_id):
    assert validate_prefix_id(prefix_id) == prefix_id


@pytest.mark.parametrize("prefix_id", ["", "-x", ":x", "a b", "a{b}", "a/b", "a\n", "x" * 129, "é", None, 7])
def test_invalid_prefix_ids_name_the_id_and_rule(prefix_id):
    with pytest.raises(InvalidIdError) as info:
        validate_prefix_id(prefix_id)
    assert repr(prefix_id) in str(info.value) and PREFIX_RULE in str(info.value)


@pytest.mark.parametrize("tenant", ["Acme", "a:b", "-a", "a{b}", "a" * 65, "", "acme\n"])
def test_invalid_tenant_ids(tenant):
    with pytest.raises(InvalidIdError, match="tenant id") as info:
        validate_tenant(tenant)
    assert TENANT_RULE in str(info.value)


def test_hash_tag_follows_the_cluster_rule():
    assert hash_tag("ps:{t:acme}:prefixes") == "t:acme"
    assert hash_tag("a{}b{c}") == "a{}b{c}"  # an empty tag means the whole key is hashed
    assert hash_tag("plain") == "plain"
    assert hash_tag("a{b}c{d}") == "b"  # only the first tag counts
    for key in ["ps:{t:acme}:prefixes", "x{y}z", "nothing"]:
        assert key_slot(key.encode()) == key_slot(hash_tag(key).encode())


def test_all_keys_of_a_tenant_share_one_slot():
    keys = Keys("ps")
    names = [keys.prefixes("acme")] + [keys.tensor("acme", pid, "0123456789abcdef")
                                       for pid in ["support-bot", "user:bob", "a.b-c"]]
    assert {hash_tag(n) for n in names} == {"t:acme"}
    assert len({key_slot(n.encode()) for n in names}) == 1
    assert hash_tag(keys.prefixes("other")) != hash_tag(keys.prefixes("acme"))
    assert hash_tag(keys.tenants()) == hash_tag(keys.api_keys()) == "tenants"
    # the admission script touches two keys at once: one slot
    assert hash_tag(keys.inflight("acme")) == hash_tag(keys.token_bucket("acme")) == hash_tag(keys.usage("acme"))


def test_keys_written_by_a_put_share_the_tenant_slot(store, raw):
    store.put("acme", "user:bob", make_kv(0), model_fingerprint=FINGERPRINT)
    store.put("acme", "user:bob", make_kv(1), model_fingerprint=FINGERPRINT)  # old tensor in grace
    store.put("acme", "task", make_kv(2), model_fingerprint=FINGERPRINT)
    written = [k.decode() for k in namespace_keys(raw, store.keys.namespace)]
    assert len(written) == 5  # index + 3 tensors + storage usage
    assert {hash_tag(k) for k in written} == {"t:acme"}


def test_ids_that_look_alike_get_distinct_keys():
    keys = Keys("ps")
    v = "0123456789abcdef"
    assert keys.tensor("acme", "a:tensor", v) != keys.tensor("acme", "a", v)
    with pytest.raises(InvalidIdError, match="version"):
        keys.tensor("acme", "a", "meta")


def test_record_json_round_trip_and_ref():
    rec = PrefixRecord(tenant="acme", prefix_id="user:bob", version="0123456789abcdef",
                       num_virtual_tokens=4, num_layers=2, num_kv_heads=2, head_dim=8, dtype="bfloat16",
                       bytes=512, created_at=1700000000.5, description="d", model_fingerprint="fp")
    assert PrefixRecord.from_json(rec.to_json()) == rec
    assert rec.ref == PrefixRef("acme", "user:bob", "0123456789abcdef")
    assert rec.shape == (2, 2, 2, 4, 8)
    with pytest.raises(ValueError, match="head_dim"):
        PrefixRecord.from_json(rec.to_json().replace('"head_dim"', '"x"'))
    event = PrefixEvent("delete", "acme", "user:bob", "0123456789abcdef")
    assert PrefixEvent.from_json(event.to_json()) == event
    with pytest.raises(ValueError, match="kind"):
        PrefixEvent.from_json(event.to_json().replace("delete", "nope"))


def test_a_huge_invalid_id_is_cut_in_the_message():
    with pytest.raises(InvalidIdError) as info:
        validate_prefix_id("x/" * 5000)
    message = str(info.value)
    assert len(message) < 300 and "(10000 characters)" in message and PREFIX_RULE in message
