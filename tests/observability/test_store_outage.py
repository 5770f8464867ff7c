"""With Redis gone, the server keeps answering and its metrics say why: store errors are
counted, a cold prefix is a 503 by route and tenant, and a warm one still serves."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from prefix_store.redis_process import RedisServer
from tests.api.harness import Stack, make_adapter, start_stack, upload
from tests.observability.conftest import PROMPT, TENANT, wait_for_count
from tests.observability.promql import scrape, value

P = "prefix_serve_"


@pytest.fixture()
def own_stack(vocab, tokenizer) -> Iterator[tuple[Stack, RedisServer]]:
    redis = RedisServer().start()  # this test stops it; the shared one must stay up
    stack = start_stack(redis.url, vocab, tokenizer)
    try:
        yield stack, redis
    finally:
        stack.stop()
        redis.close()


def test_store_outage_is_counted(own_stack, vocab):
    stack, redis = own_stack
    key = stack.create_tenant(TENANT)
    with stack.client(key) as c:
        for name, seed in (("warm", 1), ("cold", 2)):
            assert upload(c, name, make_adapter(vocab, 4, seed=seed).zip_bytes).status_code == 201
        body = {"prompt": PROMPT, "max_tokens": 2}
        assert c.post("/v1/generate", json={**body, "prefix_id": "warm"}).status_code == 200
        assert value(scrape(stack.url), P + "store_errors_total") == 0

        redis.stop()
        r = c.post("/v1/generate", json={**body, "prefix_id": "cold"})
        assert r.status_code == 503, r.text
        r = c.post("/v1/generate", json={**body, "prefix_id": "warm"})  # resident: still served
        assert r.status_code == 200, r.text
    samples = wait_for_count(stack.url, P + "http_requests_total", 2, route="/v1/generate", status="200",
                             tenant=TENANT)
    # at least the two version checks of the requests above found Redis unreachable
    assert value(samples, P + "store_errors_total") == stack.store.errors >= 2
    assert value(samples, P + "http_requests_total", route="/v1/generate", status="503", tenant=TENANT) == 1
    assert value(samples, P + "http_requests_total", route="/v1/generate", status="200", tenant=TENANT) == 2
    assert value(samples, P + "host_prefixes") == 1  # only the warm one was ever loaded
