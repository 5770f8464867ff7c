"""A server in bfloat16: an upload stores a bfloat16 copy beside the float32 tensor, loads
read that copy, and a prefix stored without one (before copies existed) serves the same
tokens from float32 cast, and gains its copy."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
import torch

from tests.api.harness import Stack, make_adapter, start_stack, upload

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def bf16_stack(redis_server, vocab, tokenizer) -> Iterator[Stack]:
    s = start_stack(redis_server.url, vocab, tokenizer, model_dtype=torch.bfloat16)
    yield s
    s.stop()


def generate(stack: Stack, key: str, prefix_id: str) -> list[int]:
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
        r = c.post("/v1/generate", json={"prefix_id": prefix_id, "prompt": PROMPT, "max_tokens": 8})
    assert r.status_code == 200, r.text
    return r.json()["token_ids"]


def test_uploads_store_a_bf16_copy_and_old_prefixes_serve_the_same_tokens(bf16_stack, vocab):
    assert bf16_stack.engine.dtype == torch.bfloat16
    key = bf16_stack.create_tenant("acme")
    store, raw = bf16_stack.store, bf16_stack.store._r
    adapter = make_adapter(vocab, num_virtual_tokens=4, seed=7)
    with httpx.Client(base_url=bf16_stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
        for prefix_id in ("with-copy", "float32-only"):
            r = upload(c, prefix_id, adapter.zip_bytes)
            assert r.status_code == 201, r.text
            assert r.json()["dtype"] == "float32"  # the prefix as uploaded; the copy is the server's business
    record = store.get_record("acme", "with-copy")
    assert list(record.serving_copies) == ["bfloat16"]
    # serve "with-copy" from its copy alone: its float32 bytes are gone
    raw.delete(store.keys.tensor("acme", "with-copy", record.version))
    # "float32-only": as stored before copies existed
    index = store.keys.prefixes("acme")
    fields = json.loads(raw.hget(index, "float32-only"))
    old_copy = store.keys.serving_copy("acme", "float32-only", fields["version"], "bfloat16")
    del fields["serving_copies"]
    raw.hset(index, "float32-only", json.dumps(fields))
    raw.delete(old_copy)
    from_copy = generate(bf16_stack, key, "with-copy")
    from_cast = generate(bf16_stack, key, "float32-only")
    assert from_copy == from_cast and len(from_copy) > 0
    assert list(store.get_record("acme", "float32-only").serving_copies) == ["bfloat16"]
    assert raw.exists(old_copy) and raw.ttl(old_copy) == -1
