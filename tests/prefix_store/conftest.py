from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from prefix_store.store import PrefixStore
from tests.prefix_store.helpers import unique_namespace


@pytest.fixture()
def namespace() -> str:
    return unique_namespace()


@pytest.fixture()
def store(redis_server, namespace) -> Iterator[PrefixStore]:
    """A store on the session Redis, alone in its own key namespace."""
    s = PrefixStore(redis_server.url, namespace=namespace)
    yield s
    s.close()


@pytest.fixture()
def raw(redis_server) -> Iterator[redis.Redis]:
    """A plain client to look behind the store's back."""
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()
