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
def store(redis_backend, namespace) -> Iterator[PrefixStore]:
    """A store alone in its own key namespace, on the session's Redis and on its Redis Cluster."""
    s = PrefixStore(redis_backend.url, namespace=namespace)
    yield s
    s.close()


@pytest.fixture()
def raw(redis_backend) -> Iterator[redis.Redis]:
    """A client to look behind the store's back (on the same Redis or cluster as `store`)."""
    client = redis_backend.client()
    yield client
    client.close()
