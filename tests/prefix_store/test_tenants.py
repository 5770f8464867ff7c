"""Tenants and API keys: keys are shown once and stored only as hashes."""

from __future__ import annotations

import hashlib

import pytest

from prefix_store.errors import TenantDeletedError, TenantExistsError
from server.prefix import InvalidIdError
from tests.prefix_store.helpers import FINGERPRINT, make_kv, namespace_keys


def all_stored_bytes(raw, namespace: str) -> bytes:
    """Every key name, hash field and value under the namespace, concatenated."""
    out = []
    for key in namespace_keys(raw, namespace):
        out.append(key)
        kind = raw.type(key)
        if kind == b"hash":
            for field, value in raw.hgetall(key).items():
                out += [field, value]
        elif kind == b"string":
            out.append(raw.get(key))
        else:
            raise AssertionError(f"unexpected {kind} key {key!r}")
    return b"\n".join(out)


def test_create_tenant_returns_a_key_that_maps_back(store):
    key = store.create_tenant("acme")
    assert key.startswith("ps-") and len(key) == 35
    assert store.tenant_for_key(key) == "acme"
    other = store.create_tenant("globex")
    assert other != key and store.tenant_for_key(other) == "globex"
    assert store.list_tenants() == ["acme", "globex"]
    assert store.tenant_exists("acme") and not store.tenant_exists("initech")


@pytest.mark.parametrize("guess", ["", "ps-", "nope", None, 42])
def test_unknown_or_malformed_keys_map_to_nobody(store, guess):
    key = store.create_tenant("acme")
    assert store.tenant_for_key(guess) is None
    assert store.tenant_for_key(key[:-1] + ("A" if key[-1] != "A" else "B")) is None


def test_api_keys_are_stored_only_hashed(store, raw):
    key = store.create_tenant("acme")
    stored = all_stored_bytes(raw, store.keys.namespace)
    assert key.encode() not in stored
    assert key[3:].encode() not in stored  # nor its random part alone
    assert hashlib.sha256(key.encode()).hexdigest().encode() in stored


def test_creating_an_existing_tenant_fails_and_keeps_its_key(store):
    key = store.create_tenant("acme")
    with pytest.raises(TenantExistsError, match="acme"):
        store.create_tenant("acme")
    assert store.tenant_for_key(key) == "acme"


def test_invalid_tenant_ids_write_nothing(store, raw):
    with pytest.raises(InvalidIdError, match="'Bad Tenant'"):
        store.create_tenant("Bad Tenant")
    assert namespace_keys(raw, store.keys.namespace) == []


def test_rotate_key(store):
    old = store.create_tenant("acme")
    new = store.rotate_key("acme")
    assert new != old
    assert store.tenant_for_key(old) is None and store.tenant_for_key(new) == "acme"
    assert store.rotate_key("initech") is None


def test_delete_tenant_removes_its_key_and_prefixes_only(store, raw):
    key = store.create_tenant("acme")
    other = store.create_tenant("globex")
    store.put("acme", "p", make_kv(0), model_fingerprint=FINGERPRINT)
    store.put("acme", "p", make_kv(1), model_fingerprint=FINGERPRINT)  # an old version in grace too
    store.put("globex", "p", make_kv(2), model_fingerprint=FINGERPRINT)
    assert store.delete_tenant("acme") is True
    assert store.tenant_for_key(key) is None and store.list("acme") == []
    assert store.list_tenants() == ["globex"]
    left = [k.decode() for k in namespace_keys(raw, store.keys.namespace)]
    # only the tombstone that refuses late writes is left of acme
    assert [k for k in left if "{t:acme}" in k] == [store.keys.incarnation("acme")]
    assert store.tenant_for_key(other) == "globex" and store.get("globex", "p") is not None
    assert store.delete_tenant("acme") is False


def test_nothing_is_written_into_a_deleted_tenant_nor_reappears_when_it_is_created_again(store):
    store.create_tenant("acme")
    life = store.tenant_incarnation("acme")
    assert life is not None
    store.put("acme", "p", make_kv(0), model_fingerprint=FINGERPRINT, incarnation=life)
    assert store.delete_tenant("acme") is True
    # a late write (a job that was running, an upload in flight) is refused
    with pytest.raises(TenantDeletedError, match="tenant 'acme' was deleted"):
        store.put("acme", "user:carol", make_kv(1), model_fingerprint=FINGERPRINT, incarnation=life)
    with pytest.raises(TenantDeletedError):
        store.put("acme", "q", make_kv(1), model_fingerprint=FINGERPRINT)
    store.create_tenant("acme")
    assert store.list("acme") == [] and store.tenant_incarnation("acme") not in (None, life)
    # the old life's job still cannot write into the new one
    with pytest.raises(TenantDeletedError):
        store.put("acme", "user:carol", make_kv(1), model_fingerprint=FINGERPRINT, incarnation=life)
    assert store.list("acme") == []
    store.put("acme", "q", make_kv(1), model_fingerprint=FINGERPRINT)  # the new life writes as usual
    assert [r.prefix_id for r in store.list("acme")] == ["q"]


def test_deleting_a_tenant_without_a_record_touches_nothing(store):
    """The admin tenant has prefixes but no record: deleting its name must not wipe them."""
    store.put("admin", "house-style", make_kv(0), model_fingerprint=FINGERPRINT)
    assert store.delete_tenant("admin") is False
    assert store.get("admin", "house-style") is not None


def test_a_half_done_deletion_is_finished_by_calling_again(store, raw):
    store.create_tenant("acme")
    store.put("acme", "p", make_kv(0), model_fingerprint=FINGERPRINT)
    store._tenants.delete("acme")  # as if the deletion stopped right after the key went
    raw.set(store.keys.incarnation("acme"), "deleting")
    with pytest.raises(TenantExistsError, match="still being deleted"):
        store.create_tenant("acme")
    assert store.delete_tenant("acme") is True
    assert store.list("acme") == []
