"""Fixtures shared by all tests. Keep this small: each is a thin wrapper over a real part."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import settings

from prefix_store.connection import make_client
from prefix_store.redis_process import RedisServer
from tests.api.harness import Stack, start_stack, tiny_tokenizer
from prefix_store.redis_cluster import RedisClusterProcesses


# Property tests write no example database into the checkout.
settings.register_profile("prefix-serve", database=None)
settings.load_profile("prefix-serve")


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


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterProcesses]:
    """One real Redis Cluster (3 masters, 1 replica each: six redis-servers) for the session,
    started by the first test that asks. Tests that kill nodes start their own."""
    cluster = RedisClusterProcesses().start()
    yield cluster
    cluster.close()


@dataclass(frozen=True)
class RedisBackend:
    kind: str  # "redis" (one server) or "cluster"
    url: str

    def client(self):
        """A client that looks behind the store's back (a RedisCluster on the cluster)."""
        return make_client(self.url)


@pytest.fixture(params=["redis", "cluster"])
def redis_backend(request) -> RedisBackend:
    """Each test that takes it runs twice: on the session's redis-server and on its cluster."""
    if request.param == "redis":
        return RedisBackend("redis", request.getfixturevalue("redis_server").url)
    return RedisBackend("cluster", request.getfixturevalue("redis_cluster").url)


@pytest.fixture(scope="session")
def tokenizer():
    """A tiny byte-level BPE tokenizer trained offline (tests/api/harness.py)."""
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def vocab(tokenizer) -> int:
    return len(tokenizer)


@pytest.fixture(scope="module")
def stack(redis_server, vocab, tokenizer) -> Iterator[Stack]:
    """A real uvicorn server (tiny Llama, float32) on the shared redis-server."""
    s = start_stack(redis_server.url, vocab, tokenizer)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer (the model converted once into the local cache)."""
    from transformers import AutoTokenizer

    from server.engine.model_loader import ensure_default_model

    return AutoTokenizer.from_pretrained(ensure_default_model())
