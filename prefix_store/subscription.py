"""A background thread that delivers the store's PrefixEvents, reconnecting while Redis is away."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis

from prefix_store.connection import TRANSPORT_ERRORS
from prefix_store.record import PrefixEvent

log = logging.getLogger(__name__)


class Subscription:
    """Calls `callback(event)` on its own thread for every event on `channel`.

    Events published while the connection is down are lost (Redis pub/sub keeps nothing),
    so after every re-subscription `on_reconnect()` runs: a cache should re-check the
    versions it holds then. The first subscription does not call it.
    """

    def __init__(self, client: redis.Redis, channel: str, callback: Callable[[PrefixEvent], None],
                 on_reconnect: Callable[[], None] | None = None, poll_interval: float = 0.2):
        self._client = client
        self._channel = channel
        self._callback = callback
        self._on_reconnect = on_reconnect
        self._poll_interval = poll_interval
        self._closed = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"prefix-events:{channel}", daemon=True)
        self._thread.start()

    @property
    def ready(self) -> bool:
        """True while subscribed: events published from now on will be delivered."""
        return self._ready.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        self._closed.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        backoff = 0.05
        subscribed_before = False
        while not self._closed.is_set():
            pubsub = self._client.pubsub()
            try:
                pubsub.subscribe(self._channel)
                while not self._closed.is_set():
                    message = pubsub.get_message(timeout=self._poll_interval)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        # also arrives when redis-py re-subscribes by itself after a reconnect
                        self._ready.set()
                        backoff = 0.05
                        if subscribed_before:
                            self._safe_call(self._on_reconnect)
                        subscribed_before = True
                    elif message["type"] == "message":
                        self._deliver(message["data"])
            except TRANSPORT_ERRORS as e:
                self._ready.clear()
                log.warning("prefix event subscription lost (%s); retrying in %.2f s", e, backoff)
                self._closed.wait(backoff)
                backoff = min(backoff * 2, 1.0)
            finally:
                try:
                    pubsub.close()
                except Exception:  # closing a dead connection may raise; nothing to recover
                    pass
        self._ready.clear()

    def _deliver(self, data: bytes) -> None:
        try:
            event = PrefixEvent.from_json(data)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring malformed prefix event %r: %s", data[:200], e)
            return
        self._safe_call(self._callback, event)

    @staticmethod
    def _safe_call(fn: Callable | None, *args) -> None:
        # a failing callback must not end the subscription; every later event would be lost
        if fn is None:
            return
        try:
            fn(*args)
        except Exception:
            log.exception("prefix event callback failed")
