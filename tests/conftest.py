"""Fixtures shared by all tests. Keep this small: each is a thin wrapper over a real part."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from prefix_store.redis_process import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server on 127.0.0.1 for the whole session (no persistence).

    Tests that stop or restart Redis start their own `RedisServer()` instead. Tests sharing
    this one keep apart by namespace or tenant id, never by FLUSHALL.
    """
    server = RedisServer(appendonly=False)
    server.start()
    yield server
    server.close()
