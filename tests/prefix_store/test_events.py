"""Pub/sub events on every change, delivered to a subscriber thread."""

from __future__ import annotations

import queue

from prefix_store.record import PrefixEvent
from tests.prefix_store.helpers import FINGERPRINT, drain, make_kv


def test_put_replace_and_delete_publish_events(store):
    events: queue.Queue = queue.Queue()
    sub = store.subscribe(events.put)
    try:
        assert sub.ready
        v1 = store.put("acme", "p", make_kv(0), model_fingerprint=FINGERPRINT)[0].version
        v2 = store.put("acme", "p", make_kv(1), model_fingerprint=FINGERPRINT)[0].version
        store.put("globex", "q", make_kv(2), model_fingerprint=FINGERPRINT)
        assert store.delete("acme", "p")
        assert not store.delete("acme", "p")  # nothing changed: no event
        store.put("acme", "last", make_kv(3), model_fingerprint=FINGERPRINT)
        got = drain(events, 5)
    finally:
        sub.close()
    v3 = store.get_record("globex", "q").version
    v4 = store.get_record("acme", "last").version
    assert got == [
        PrefixEvent("put", "acme", "p", v1), PrefixEvent("put", "acme", "p", v2),
        PrefixEvent("put", "globex", "q", v3), PrefixEvent("delete", "acme", "p", v2),
        PrefixEvent("put", "acme", "last", v4),
    ]
    assert events.empty()


def test_a_failing_callback_does_not_end_the_subscription(store):
    events: queue.Queue = queue.Queue()

    def callback(event: PrefixEvent) -> None:
        events.put(event)
        if event.prefix_id == "boom":
            raise RuntimeError("callback bug")

    sub = store.subscribe(callback)
    try:
        store.put("acme", "boom", make_kv(0), model_fingerprint=FINGERPRINT)
        store.put("acme", "after", make_kv(1), model_fingerprint=FINGERPRINT)
        got = drain(events, 2)
    finally:
        sub.close()
    assert [e.prefix_id for e in got] == ["boom", "after"]


def test_events_of_other_namespaces_are_not_delivered(store, redis_backend):
    from prefix_store.store import PrefixStore

    events: queue.Queue = queue.Queue()
    sub = store.subscribe(events.put)
    other = PrefixStore(redis_backend.url, namespace=store.keys.namespace + "x")
    try:
        other.put("acme", "elsewhere", make_kv(0), model_fingerprint=FINGERPRINT)
        store.put("acme", "here", make_kv(1), model_fingerprint=FINGERPRINT)
        got = drain(events, 1)
    finally:
        sub.close()
        other.close()
    assert [e.prefix_id for e in got] == ["here"] and events.empty()


def test_close_stops_the_thread(store):
    sub = store.subscribe(lambda e: None)
    sub.close()
    assert not sub._thread.is_alive() and not sub.ready
