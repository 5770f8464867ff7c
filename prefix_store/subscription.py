"""A background thread that delivers the store's events, reconnecting while Redis is away."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import redis
from redis.cluster import RedisCluster

from prefix_store.connection import TRANSPORT_ERRORS

log = logging.getLogger(__name__)

# channel -> (parse: bytes -> event, callback: event -> None)
Handlers = dict[str, tuple[Callable[[bytes], Any], Callable[[Any], None]]]


class Subscription:
    """Calls each channel's callback, on its own thread, for every event published on it.

    Events published while the connection is down are lost (Redis pub/sub keeps nothing),
    so after every re-subscription `on_reconnect()` runs: a cache should re-check what it
    holds then. The first subscription does not call it. In a Redis Cluster, PUBLISH reaches
    every node, so one connection to any node hears every channel; after a node failure
    the client learns the new topology and subscribes elsewhere.
    """

    def __init__(self, client: redis.Redis | RedisCluster, handlers: Handlers,
                 on_reconnect: Callable[[], None] | None = None, poll_interval: float = 0.2):
        if not handlers:
            raise ValueError("a subscription needs at least one channel")
        self._client = client
        self._handlers = dict(handlers)
        self._on_reconnect = on_reconnect
        self._poll_interval = poll_interval
        self._closed = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"store-events:{','.join(handlers)}", daemon=True)
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
        channels = list(self._handlers)
        while not self._closed.is_set():
            pubsub = None
            try:
                pubsub = self._client.pubsub()
                pubsub.subscribe(*channels)
                pending = set(channels)
                while not self._closed.is_set():
                    message = pubsub.get_message(timeout=self._poll_interval)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        # also arrives when redis-py re-subscribes by itself after a reconnect
                        pending.discard(_text(message["channel"]))
                        if pending:
                            continue
                        pending = set(channels)
                        self._ready.set()
                        backoff = 0.05
                        if subscribed_before:
                            self._safe_call(self._on_reconnect)
                        subscribed_before = True
                    elif message["type"] == "message":
                        self._deliver(_text(message["channel"]), message["data"])
            except TRANSPORT_ERRORS as e:
                self._ready.clear()
                log.warning("store event subscription lost (%s); retrying in %.2f s", e, backoff)
                self._closed.wait(backoff)
                backoff = min(backoff * 2, 1.0)
                self._refresh_topology()
            finally:
                try:
                    if pubsub is not None:
                        pubsub.close()
                except Exception:  # closing a dead connection may raise; nothing to recover
                    pass
        self._ready.clear()

    def _refresh_topology(self) -> None:
        """A cluster client keeps the node it subscribed on until told otherwise."""
        if isinstance(self._client, RedisCluster):
            try:
                self._client.nodes_manager.initialize()
            except Exception as e:  # still failing over: the next round tries again
                log.debug("cluster topology refresh failed: %s", e)

    def _deliver(self, channel: str, data: bytes) -> None:
        handler = self._handlers.get(channel)
        if handler is None:
            return
        parse, callback = handler
        try:
            event = parse(data)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring malformed event on %s %r: %s", channel, data[:200], e)
            return
        self._safe_call(callback, event)

    @staticmethod
    def _safe_call(fn: Callable | None, *args) -> None:
        # a failing callback must not end the subscription; every later event would be lost
        if fn is None:
            return
        try:
            fn(*args)
        except Exception:
            log.exception("store event callback failed")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
