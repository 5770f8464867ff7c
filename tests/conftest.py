"""Fixtures shared by all tests. Keep this small: each is a thin wrapper over a real part."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import settings

from prefix_store.redis_process import RedisServer
from tests.api.harness import Stack, start_stack, tiny_tokenizer


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
