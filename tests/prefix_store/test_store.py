"""PrefixStore against a real redis-server: round trips, versions, atomic replace, isolation."""

from __future__ import annotations

import hashlib
import sys
import threading

import pytest
import torch
from safetensors.torch import save as st_save

from prefix_store.errors import StoreIntegrityError
from server.prefix import InvalidIdError
from server.prefix import PrefixError, PrefixRef
from tests.prefix_store.helpers import FINGERPRINT, make_kv, namespace_keys


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_exact(store, dtype):
    kv = make_kv(0, dtype, plen=5)
    record, created = store.put("acme", "support-bot", kv, model_fingerprint=FINGERPRINT, description="help")
    assert created
    got_record, got = store.get("acme", "support-bot")
    assert got_record == record
    assert got.dtype == dtype and torch.equal(got, kv)
    assert (record.num_layers, record.num_kv_heads, record.num_virtual_tokens, record.head_dim) == (2, 2, 5, 8)
    assert record.dtype == str(dtype).removeprefix("torch.")
    assert record.bytes == kv.numel() * kv.element_size()
    assert record.description == "help" and record.model_fingerprint == FINGERPRINT
    assert record.ref == PrefixRef("acme", "support-bot", record.version)
    assert store.get_record("acme", "support-bot") == record


def test_version_is_the_content_hash(store):
    kv = make_kv(0)
    record, _ = store.put("acme", "p", kv, model_fingerprint=FINGERPRINT)
    expected = hashlib.sha256(st_save({"prefix_kv": kv.contiguous()})).hexdigest()[:16]
    assert record.version == expected


def test_versions_change_with_content_and_replace_reports_not_created(store, raw):
    first, created1 = store.put("acme", "p", make_kv(0), model_fingerprint=FINGERPRINT)
    second, created2 = store.put("acme", "p", make_kv(1), model_fingerprint=FINGERPRINT)
    assert created1 and not created2
    assert first.version != second.version
    record, kv = store.get("acme", "p")
    assert record.version == second.version and torch.equal(kv, make_kv(1))
    # same content again: same version; dtype is part of the content
    assert store.put("acme", "p", make_kv(1), model_fingerprint=FINGERPRINT)[0].version == second.version
    assert store.put("acme", "p", make_kv(1, torch.bfloat16), model_fingerprint=FINGERPRINT)[0].version \
        != second.version


def test_old_version_stays_readable_for_the_grace_period(store, raw):
    first, _ = store.put("acme", "p", make_kv(0), model_fingerprint=FINGERPRINT)
    second, _ = store.put("acme", "p", make_kv(1), model_fingerprint=FINGERPRINT)
    assert torch.equal(store.get_version("acme", "p", first.version), make_kv(0))
    old_ttl = raw.ttl(store.keys.tensor("acme", "p", first.version))
    assert 0 < old_ttl <= store.old_version_grace_s
    assert raw.ttl(store.keys.tensor("acme", "p", second.version)) == -1  # current: never expires
    # uploading the old content again makes it current and permanent again
    store.put("acme", "p", make_kv(0), model_fingerprint=FINGERPRINT)
    assert raw.ttl(store.keys.tensor("acme", "p", first.version)) == -1


def test_get_rereads_when_the_tensor_goes_between_its_two_reads(redis_server, namespace, monkeypatch):
    """The worst moment for a replace: after get() read the metadata, before the tensor."""
    from prefix_store.store import PrefixStore

    store = PrefixStore(redis_server.url, namespace=namespace, old_version_grace_s=0)  # old tensor goes at once
    store.put("acme", "p", make_kv(0), model_fingerprint=FINGERPRINT)
    read_meta = store.get_record
    calls = []

    def racing_get_record(tenant, prefix_id):
        record = read_meta(tenant, prefix_id)
        if not calls:
            store.put("acme", "p", make_kv(1), model_fingerprint=FINGERPRINT)
        calls.append(record.version)
        return record

    monkeypatch.setattr(store, "get_record", racing_get_record)
    record, kv = store.get("acme", "p")
    assert len(calls) == 2 and calls[0] != calls[1]
    assert record.version == calls[1] and torch.equal(kv, make_kv(1))
    store.close()


def test_replace_is_atomic_under_concurrent_reads(store):
    """A reader hammering the prefix while a writer replaces it 300 times with new content."""
    from prefix_store.codec import encode

    expected = {}  # version -> tensor, filled by the writer before each put
    first = make_kv(0)
    expected[store.put("acme", "hot", first, model_fingerprint=FINGERPRINT)[0].version] = first
    stop = threading.Event()
    writes = []

    def writer():
        try:
            for i in range(1, 301):
                kv = make_kv(i, plen=2 + i % 3)  # new content each time: a version never seen before
                expected[encode(kv)[1]] = kv
                writes.append(store.put("acme", "hot", kv, model_fingerprint=FINGERPRINT)[0].version)
        finally:
            stop.set()

    thread = threading.Thread(target=writer)
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # interleave the two threads finely, so that any window shows
    thread.start()
    reads = 0
    try:
        while not stop.is_set() or reads < 50:
            # metadata is never visible before its tensor
            meta = store.get_record("acme", "hot")
            assert store.get_version("acme", "hot", meta.version) is not None
            # the tensor is exactly the one the metadata's version names, shape included
            record, kv = store.get("acme", "hot")
            assert torch.equal(kv, expected[record.version])
            assert tuple(kv.shape) == record.shape
            reads += 1
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(switch_interval)
    assert len(writes) == 300 and reads >= 50
    assert store.get("acme", "hot")[0].version == writes[-1]


def commands_seen_by_redis(raw, action) -> list[str]:
    """Every command Redis executes while `action()` runs (MONITOR), up to a marker."""
    marker = f"end-of-action-{id(action)}"
    with raw.monitor() as monitor:
        action()
        raw.get(marker)  # on another connection of the pool
        commands = []
        while marker not in (command := monitor.next_command()["command"]):
            commands.append(command)
    return commands


WRITES = ("SET ", "HSET ", "HDEL ", "EXPIRE ", "DEL ", "UNLINK ")


@pytest.mark.parametrize("action", ["replace", "delete"])
def test_every_change_reaches_redis_as_one_transaction(store, raw, action, redis_backend):
    """Deterministic companion of the hammer test: no write ever runs outside MULTI/EXEC;
    the event follows the EXEC (a Redis Cluster MULTI cannot carry PUBLISH)."""
    if redis_backend.kind == "cluster":
        pytest.skip("MONITOR watches one node; the transaction code is the same on the cluster")
    store.put("acme", "p", make_kv(0), model_fingerprint=FINGERPRINT)
    if action == "replace":
        run = lambda: store.put("acme", "p", make_kv(1), model_fingerprint=FINGERPRINT)  # noqa: E731
    else:
        run = lambda: store.delete("acme", "p")  # noqa: E731
    commands = commands_seen_by_redis(raw, run)
    writes = [i for i, c in enumerate(commands) if c.startswith(WRITES)]
    assert writes, commands
    begin, end = commands.index("MULTI"), commands.index("EXEC")
    assert all(begin < i < end for i in writes), commands
    assert commands[end + 1].startswith("PUBLISH "), commands


def test_delete(store, raw):
    record, _ = store.put("acme", "p", make_kv(0), model_fingerprint=FINGERPRINT)
    store.put("acme", "q", make_kv(1), model_fingerprint=FINGERPRINT)
    assert store.delete("acme", "p") is True
    assert store.get("acme", "p") is None and store.get_record("acme", "p") is None
    assert [r.prefix_id for r in store.list("acme")] == ["q"]
    assert store.delete("acme", "p") is False
    assert 0 < raw.ttl(store.keys.tensor("acme", "p", record.version)) <= store.old_version_grace_s
    # a new upload under the deleted id is created afresh
    assert store.put("acme", "p", make_kv(2), model_fingerprint=FINGERPRINT)[1] is True


def test_list_is_sorted_and_tenant_isolated(store):
    for seed, pid in enumerate(["zeta", "alpha", "user:bob"]):
        store.put("acme", pid, make_kv(seed), model_fingerprint=FINGERPRINT)
    store.put("globex", "alpha", make_kv(99), model_fingerprint=FINGERPRINT)
    assert [r.prefix_id for r in store.list("acme")] == ["alpha", "user:bob", "zeta"]
    assert [(r.tenant, r.prefix_id) for r in store.list("globex")] == [("globex", "alpha")]
    assert store.list("initech") == []
    # globex cannot read, version-probe or delete acme's prefixes; same-named ids stay apart
    zeta = store.get_record("acme", "zeta")
    assert store.get("globex", "zeta") is None
    assert store.get_version("globex", "zeta", zeta.version) is None
    assert store.delete("globex", "zeta") is False
    assert torch.equal(store.get("globex", "alpha")[1], make_kv(99))
    assert not torch.equal(store.get("acme", "alpha")[1], make_kv(99))
    assert store.get_record("acme", "zeta") == zeta


@pytest.mark.parametrize("tenant, prefix_id, bad", [
    ("Acme", "p", "'Acme'"), ("acme", "bad id", "'bad id'"), ("acme", "a{x}", "'a{x}'"),
    ("acme", "../etc", "'../etc'"), ("a" * 65, "p", "'" + "a" * 65 + "'"),
])
def test_invalid_ids_are_rejected_and_nothing_is_written(store, raw, tenant, prefix_id, bad):
    with pytest.raises(InvalidIdError) as info:
        store.put(tenant, prefix_id, make_kv(0), model_fingerprint=FINGERPRINT)
    assert bad in str(info.value) and "must match" in str(info.value)
    with pytest.raises(InvalidIdError):
        store.get(tenant, prefix_id)
    with pytest.raises(InvalidIdError):
        store.delete(tenant, prefix_id)
    assert namespace_keys(raw, store.keys.namespace) == []


@pytest.mark.parametrize("kv, message", [
    (torch.zeros(2, 2, 4, 8), "shape"), (torch.zeros(2, 3, 2, 4, 8), "shape"),
    (torch.zeros(2, 2, 2, 4, 8, dtype=torch.int32), "dtype int32"),
    (torch.zeros(2, 2, 2, 0, 8), "no elements"),
])
def test_malformed_tensors_are_rejected_and_nothing_is_written(store, raw, kv, message):
    with pytest.raises(PrefixError, match=message):
        store.put("acme", "p", kv, model_fingerprint=FINGERPRINT)
    with pytest.raises(ValueError, match="model_fingerprint"):
        store.put("acme", "p", make_kv(0), model_fingerprint="")
    with pytest.raises(ValueError, match="description has 4097 characters; the limit is 4096"):
        store.put("acme", "p", make_kv(0), model_fingerprint=FINGERPRINT, description="x" * 4097)
    assert namespace_keys(raw, store.keys.namespace) == []


def test_a_tensor_that_does_not_match_its_version_is_never_served(store, raw):
    record, _ = store.put("acme", "p", make_kv(0), model_fingerprint=FINGERPRINT)
    raw.set(store.keys.tensor("acme", "p", record.version), st_save({"prefix_kv": make_kv(1)}))
    with pytest.raises(StoreIntegrityError, match=record.version):
        store.get("acme", "p")
    raw.delete(store.keys.tensor("acme", "p", record.version))
    with pytest.raises(StoreIntegrityError, match="tensor is missing"):
        store.get("acme", "p")


def test_ping(store):
    assert store.ping() is True
