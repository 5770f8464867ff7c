"""Serving copies (a version's tensor cast to a server's dtype, under its own key) and the
hash-once check, against a real redis-server and a Redis Cluster."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
import torch
from safetensors.torch import save as st_save

from prefix_store import codec
from prefix_store.errors import StoreIntegrityError
from prefix_store.keys import hash_tag
from server.api.host_prefixes import HostPrefixes
from server.api.prefix_resolver import PrefixResolver
from server.prefix import Prefix
from tests.prefix_store.helpers import FINGERPRINT, make_kv, namespace_keys
from tests.prefix_store.test_store import commands_seen_by_redis

BF16 = torch.bfloat16


def copy_key(store, record, name: str = "bfloat16") -> str:
    return store.keys.serving_copy(record.tenant, record.prefix_id, record.version, name)


def tensor_key(store, record) -> str:
    return store.keys.tensor(record.tenant, record.prefix_id, record.version)


def test_put_writes_a_copy_that_is_exactly_the_cast(store, raw):
    kv = make_kv(0)
    record, _ = store.put("acme", "p", kv, model_fingerprint=FINGERPRINT, serving_dtype=BF16)
    assert record.version == codec.encode(kv)[1]  # the version does not depend on the serving dtype
    assert record.dtype == "float32" and record.bytes == kv.numel() * 4
    copy_bytes = raw.get(copy_key(store, record))
    assert record.serving_copies == {"bfloat16": codec.content_version(copy_bytes)}
    assert store.get_record("acme", "p") == record
    assert hash_tag(copy_key(store, record)) == hash_tag(tensor_key(store, record)) == "t:acme"
    served = store.get_serving(record, BF16)
    assert served.dtype == BF16 and torch.equal(served, kv.to(BF16))
    # the canonical tensor is still float32 and exact
    assert torch.equal(store.get_version("acme", "p", record.version), kv)
    # the copy alone is read: with the float32 bytes gone, it still serves
    raw.delete(tensor_key(store, record))
    store.forget_verified()
    assert torch.equal(store.get_serving(record, BF16), kv.to(BF16))


def test_a_copy_for_the_stored_dtype_is_not_written(store, raw):
    record, _ = store.put("acme", "p", make_kv(0, BF16), model_fingerprint=FINGERPRINT, serving_dtype=BF16)
    assert record.serving_copies == {}
    assert not raw.exists(copy_key(store, record))
    assert torch.equal(store.get_serving(record, BF16), make_kv(0, BF16))


def test_a_corrupted_copy_is_refused(store, raw):
    record, _ = store.put("acme", "p", make_kv(0), model_fingerprint=FINGERPRINT, serving_dtype=BF16)
    raw.set(copy_key(store, record), st_save({"prefix_kv": make_kv(1).to(BF16)}))  # same shape, other values
    with pytest.raises(StoreIntegrityError, match=f"bfloat16 copy of version {record.version}.*expected "
                                                  f"{record.serving_copies['bfloat16']}"):
        store.get_serving(record, BF16)


def test_a_copy_of_the_wrong_dtype_is_refused_even_with_a_matching_hash(store, raw):
    record, _ = store.put("acme", "p", make_kv(0), model_fingerprint=FINGERPRINT)
    wrong = st_save({"prefix_kv": make_kv(0).to(torch.float16)})
    raw.set(copy_key(store, record), wrong)
    forged = dataclasses.replace(record, serving_copies={"bfloat16": codec.content_version(wrong)})
    with pytest.raises(StoreIntegrityError, match=r"holds float16 \(2, 2, 2, 3, 8\), expected bfloat16"):
        store.get_serving(forged, BF16)


def test_replace_and_delete_expire_the_copy_with_its_tensor(store, raw):
    first, _ = store.put("acme", "p", make_kv(0), model_fingerprint=FINGERPRINT, serving_dtype=BF16)
    second, _ = store.put("acme", "p", make_kv(1), model_fingerprint=FINGERPRINT, serving_dtype=BF16)
    for key in (tensor_key(store, first), copy_key(store, first)):
        assert 0 < raw.ttl(key) <= store.old_version_grace_s, key
    for key in (tensor_key(store, second), copy_key(store, second)):
        assert raw.ttl(key) == -1, key  # the current version's keys never expire
    # a reader holding the old record still gets the old copy during the grace period
    assert torch.equal(store.get_serving(first, BF16), make_kv(0).to(BF16))
    assert store.delete("acme", "p") is True
    for key in (tensor_key(store, second), copy_key(store, second)):
        assert 0 < raw.ttl(key) <= store.old_version_grace_s, key


def test_uploading_the_same_version_again_keeps_its_copies(store, raw):
    store.put("acme", "p", make_kv(0), model_fingerprint=FINGERPRINT, serving_dtype=BF16)
    record, created = store.put("acme", "p", make_kv(0), model_fingerprint=FINGERPRINT, serving_dtype=torch.float16)
    assert created is False and sorted(record.serving_copies) == ["bfloat16", "float16"]
    assert torch.equal(store.get_serving(record, BF16), make_kv(0).to(BF16))
    assert torch.equal(store.get_serving(record, torch.float16), make_kv(0).to(torch.float16))
    assert raw.ttl(copy_key(store, record)) == -1 and raw.ttl(copy_key(store, record, "float16")) == -1


def test_a_float32_only_prefix_loads_cast_and_gains_its_copy(store, raw):
    kv = make_kv(0)
    record, _ = store.put("acme", "p", kv, model_fingerprint=FINGERPRINT)
    # a record as stored before serving copies existed, with a field from a newer writer
    index = store.keys.prefixes("acme")
    old_fields = json.loads(raw.hget(index, "p"))
    del old_fields["serving_copies"]
    old_fields["from_the_future"] = 1
    raw.hset(index, "p", json.dumps(old_fields))
    old_record = store.get_record("acme", "p")
    assert old_record.serving_copies == {}
    served = store.get_serving(old_record, BF16)
    assert served.dtype == BF16 and torch.equal(served, kv.to(BF16))
    # the copy is now stored and named in the record; other fields survive
    fields = json.loads(raw.hget(index, "p"))
    copy_bytes = raw.get(copy_key(store, record))
    assert fields["serving_copies"] == {"bfloat16": codec.content_version(copy_bytes)}
    assert fields["from_the_future"] == 1 and fields["version"] == record.version
    assert raw.ttl(copy_key(store, record)) == -1
    assert torch.equal(codec.decode(copy_bytes, fields["serving_copies"]["bfloat16"]), kv.to(BF16))
    # the next reader takes the copy (the float32 bytes are not needed)
    raw.delete(tensor_key(store, record))
    assert torch.equal(store.get_serving(store.get_record("acme", "p"), BF16), kv.to(BF16))


def test_no_copy_is_written_for_a_version_that_was_replaced(store, raw):
    first, _ = store.put("acme", "p", make_kv(0), model_fingerprint=FINGERPRINT)
    second, _ = store.put("acme", "p", make_kv(1), model_fingerprint=FINGERPRINT)
    assert torch.equal(store.get_serving(first, BF16), make_kv(0).to(BF16))  # within its grace period
    assert not raw.exists(copy_key(store, first))  # it would never expire
    assert store.get_record("acme", "p") == second


def test_the_copy_write_back_is_one_transaction(store, raw, redis_backend):
    if redis_backend.kind == "cluster":
        pytest.skip("MONITOR watches one node; the transaction code is the same on the cluster")
    record, _ = store.put("acme", "p", make_kv(0), model_fingerprint=FINGERPRINT)
    commands = commands_seen_by_redis(raw, lambda: store.get_serving(record, BF16))
    writes = [i for i, c in enumerate(commands) if c.startswith(("SET ", "HSET "))]
    assert len(writes) == 2, commands
    begin, end = commands.index("MULTI"), commands.index("EXEC")
    assert all(begin < i < end for i in writes), commands


def test_deleting_the_tenant_removes_the_copies(store, raw):
    store.create_tenant("acme")
    store.put("acme", "p", make_kv(0), model_fingerprint=FINGERPRINT, serving_dtype=BF16)
    record, _ = store.put("acme", "q", make_kv(1), model_fingerprint=FINGERPRINT)
    store.get_serving(record, BF16)  # a written-back copy too
    assert store.delete_tenant("acme") is True
    assert [k for k in namespace_keys(raw, store.keys.namespace) if b":prefix:" in k] == []


def count_hashes(monkeypatch) -> list[int]:
    calls = [0]
    real = codec.content_version

    def counting(data: bytes) -> str:
        calls[0] += 1
        return real(data)

    monkeypatch.setattr(codec, "content_version", counting)
    return calls


def test_a_version_is_hashed_once_per_process(store, raw, monkeypatch):
    record, _ = store.put("acme", "p", make_kv(0), model_fingerprint=FINGERPRINT, serving_dtype=BF16)
    calls = count_hashes(monkeypatch)
    for _ in range(3):
        assert torch.equal(store.get_version("acme", "p", record.version), make_kv(0))
        assert torch.equal(store.get_serving(record, BF16), make_kv(0).to(BF16))
    assert calls[0] == 2  # the float32 tensor and the bfloat16 copy, once each
    store.forget_verified()  # what the resolver does when the store reconnects
    store.get_serving(record, BF16)
    assert calls[0] == 3


def test_bytes_of_another_length_are_hashed_again_and_refused(store, raw, monkeypatch):
    record, _ = store.put("acme", "p", make_kv(0), model_fingerprint=FINGERPRINT)
    store.get_version("acme", "p", record.version)  # verified now
    calls = count_hashes(monkeypatch)
    raw.set(tensor_key(store, record), st_save({"prefix_kv": make_kv(1, plen=4)}))
    with pytest.raises(StoreIntegrityError, match=f"expected {record.version}"):
        store.get_version("acme", "p", record.version)
    assert calls[0] == 1


def test_the_verified_set_is_bounded(store):
    store.verified.capacity = 2
    records = [store.put("acme", f"p{i}", make_kv(i), model_fingerprint=FINGERPRINT)[0] for i in range(3)]
    for r in records:
        store.get_version("acme", r.prefix_id, r.version)
    assert len(store.verified) == 2


def test_the_resolver_serves_the_copy_in_the_engine_dtype(store, raw):
    kv = make_kv(0)
    store.put("acme", "p", kv, model_fingerprint=FINGERPRINT, serving_dtype=BF16)
    seen = []

    def make_prefix(kv: torch.Tensor, refs) -> Prefix:
        seen.append(kv.dtype)
        return Prefix(kv=kv, spec=None, refs=refs)

    resolver = PrefixResolver(store, make_prefix, HostPrefixes(1 << 20), FINGERPRINT, serving_dtype=BF16)
    record = store.get_record("acme", "p")
    raw.delete(tensor_key(store, record))  # only the copy can serve it now
    prefix = asyncio.run(resolver.resolve("acme", ["p"]))
    assert seen == [BF16] and torch.equal(prefix.kv, kv.to(BF16)) and prefix.refs == (record.ref,)
    resolver.on_reconnect()
    assert len(store.verified) == 0
