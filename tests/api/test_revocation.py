"""The Authenticator's memory of keys against a real store: remembered keys save a Redis
round trip, and every way a revocation could be missed is closed (server/api/auth.py)."""

from __future__ import annotations

import asyncio

import pytest

from prefix_store import PrefixStore
from prefix_store.record import TenantEvent
from server.api.auth import Authenticator
from server.api.errors import ApiError
from tests.prefix_store.helpers import drain, unique_namespace

ADMIN = "admin-key-0123456789abcdef"


@pytest.fixture()
def store(redis_server):
    s = PrefixStore(redis_server.url, namespace=unique_namespace())
    yield s
    s.close()


class CountingStore:
    """The real store, counting key lookups (to see when the memory answered instead)."""

    def __init__(self, store: PrefixStore, during_lookup=None):
        self.store, self.lookups, self.during_lookup = store, 0, during_lookup

    def tenant_for_key(self, key: str):
        self.lookups += 1
        tenant = self.store.tenant_for_key(key)
        if self.during_lookup is not None:
            self.during_lookup()
        return tenant


def auth_tenant(auth: Authenticator, key: str) -> str | int:
    try:
        return asyncio.run(auth.authenticate(f"Bearer {key}")).tenant
    except ApiError as e:
        return e.status


def test_a_remembered_key_is_forgotten_when_its_tenant_event_arrives(store):
    key = store.create_tenant("acme")
    counting = CountingStore(store)
    auth = Authenticator(counting, ADMIN)
    auth.events_live = lambda: True
    assert auth_tenant(auth, key) == "acme" and auth_tenant(auth, key) == "acme"
    assert counting.lookups == 1  # the second answer came from memory
    store.rotate_key("acme")  # no subscription here: the memory does not know yet...
    assert auth_tenant(auth, key) == "acme"
    auth.on_tenant_event(TenantEvent("key_rotated", "acme"))  # ...until the event arrives
    assert auth_tenant(auth, key) == 401


def test_without_live_events_every_request_asks_redis(store):
    key = store.create_tenant("acme")
    counting = CountingStore(store)
    auth = Authenticator(counting, ADMIN)  # events_live stays False: not subscribed
    assert auth_tenant(auth, key) == "acme" and auth_tenant(auth, key) == "acme"
    assert counting.lookups == 2
    store.delete_tenant("acme")
    assert auth_tenant(auth, key) == 401


def test_a_lookup_overtaken_by_a_revocation_is_not_remembered(store):
    key = store.create_tenant("acme")
    auth = Authenticator(None, ADMIN)
    # the lookup reads the still valid key, then the rotation and its event land before
    # the answer is stored: remembering it would keep the old key alive
    counting = CountingStore(store, during_lookup=lambda: (store.rotate_key("acme"),
                                                          auth.on_tenant_event(TenantEvent("key_rotated", "acme"))))
    auth.store = counting
    auth.events_live = lambda: True
    assert auth_tenant(auth, key) == "acme"  # it was valid when read
    counting.during_lookup = None
    assert auth_tenant(auth, key) == 401
    assert counting.lookups == 2


def test_a_resubscription_forgets_every_key(store):
    key = store.create_tenant("acme")
    auth = Authenticator(store, ADMIN)
    auth.events_live = lambda: True
    assert auth_tenant(auth, key) == "acme"
    store.delete_tenant("acme")  # its event was published while we were not listening
    auth.forget_all()  # what the app's on_reconnect does
    assert auth_tenant(auth, key) == 401


def test_the_store_publishes_tenant_events_for_rotation_and_deletion(store):
    import queue

    events: queue.Queue = queue.Queue()
    store.create_tenant("acme")
    sub = store.subscribe(lambda e: None, on_tenant_event=events.put)
    try:
        assert store.rotate_key("acme") is not None
        assert store.rotate_key("nobody") is None  # nothing published for a missing tenant
        assert store.delete_tenant("acme")
        got = drain(events, 2)
    finally:
        sub.close()
    assert got == [TenantEvent("key_rotated", "acme"), TenantEvent("deleted", "acme")]
    assert events.empty()
