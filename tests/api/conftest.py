"""End-to-end fixtures: a real uvicorn server (background thread) running the real app over
a tiny random Llama with a real (tiny, trained here) HF tokenizer, a real redis-server, and
real PEFT adapters uploaded over HTTP."""

from __future__ import annotations

from collections.abc import Callable

import httpx

import pytest

from tests.api.harness import make_adapter, upload


@pytest.fixture(scope="module")
def tenant_key(stack) -> str:
    return stack.create_tenant("acme")


@pytest.fixture(scope="module")
def adapters(vocab):
    """Four PEFT prefix adapters of different lengths, randomised by PEFT."""
    return [make_adapter(vocab, num_virtual_tokens=n, seed=s) for s, n in zip(range(1, 5), (4, 6, 8, 5))]


@pytest.fixture()
def uploader(stack) -> Callable[..., httpx.Response]:
    """upload(key, prefix_id, data, filename, **form) -> the server's response."""
    def _upload(key: str, prefix_id: str, data: bytes, filename: str = "adapter.zip", **form) -> httpx.Response:
        with stack.client(key) as c:
            return upload(c, prefix_id, data, filename, **form)
    return _upload
