"""Per-tenant limits through the API: the admin sets them, a tenant's queue cap and token rate
answer 429 with Retry-After (and the numbers), one tenant's backlog never gets another
tenant a 429, and storage quotas are enforced at upload and job creation and reported.

One request runs at a time here and each step is slowed (50 ms) so that the long request
holding the slot surely still runs (12 s) while the test acts, even on a loaded machine;
nothing asserts on time."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import pytest

from tests.api.harness import ADMIN_KEY, Stack, make_adapter, start_stack, upload
from tests.api.test_resilience import LONG, blocks_all_free, wait_until

SHORT = {"prompt": "hello", "max_tokens": 2}


@pytest.fixture(scope="module")
def slow(redis_server, vocab, tokenizer) -> Iterator[Stack]:
    s = start_stack(redis_server.url, vocab, tokenizer, slow_step_s=0.05, max_num_seqs=1, max_queue=2)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def keys(slow) -> dict[str, str]:
    return {t: slow.create_tenant(t) for t in ("heavy", "light", "rated", "storer")}


def set_limits(stack: Stack, tenant: str, **limits) -> httpx.Response:
    with stack.client(ADMIN_KEY) as admin:
        return admin.put(f"/v1/admin/tenants/{tenant}/limits", json=limits)


class Background:
    """Requests sent from threads; their responses once joined."""

    def __init__(self, stack: Stack, key: str) -> None:
        self.stack, self.key, self.threads, self.responses = stack, key, [], []

    def post(self, body: dict) -> None:
        def run() -> None:
            with self.stack.client(self.key) as c:
                self.responses.append(c.post("/v1/generate", json=body))
        t = threading.Thread(target=run)
        t.start()
        self.threads.append(t)

    def join(self) -> list[int]:
        for t in self.threads:
            t.join(120)
        return sorted(r.status_code for r in self.responses)


def hold_the_running_slot(stack: Stack, key: str):
    """A long stream of `key`'s tenant that holds the only running slot (a context manager)."""
    client = stack.client(key)
    cm = client.stream("POST", "/v1/generate", json={**LONG, "max_tokens": 240, "stream": True})
    response = cm.__enter__()
    lines = response.iter_lines()
    next(line for line in lines if line.startswith("data: {"))
    return client, cm, lines


def release(held) -> None:
    client, cm, _ = held
    cm.__exit__(None, None, None)
    client.close()


def test_one_tenants_backlog_does_not_get_another_tenant_a_429(slow, keys):
    held = hold_the_running_slot(slow, keys["heavy"])
    try:
        heavy = Background(slow, keys["heavy"])
        for _ in range(2):
            heavy.post(SHORT)
        wait_until(lambda: slow.engine.num_waiting == 2, "the queue is full (max_queue 2) of heavy's requests")
        with slow.client(keys["heavy"]) as c:
            r = c.post("/v1/generate", json=SHORT)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert "2 of them yours; your share is 2" in r.json()["error"]["message"]
        light = Background(slow, keys["light"])
        light.post(SHORT)  # the queue is full, but light has none of it: it waits its turn
        wait_until(lambda: slow.engine.num_waiting == 3, "light's request waits beside heavy's")
        with slow.client(keys["heavy"]) as c:  # heavy's share is now one of the two
            r = c.post("/v1/generate", json=SHORT)
            assert r.status_code == 429 and "your share is 1" in r.json()["error"]["message"]
    finally:
        release(held)
    assert light.join() == [200] and heavy.join() == [200, 200]
    wait_until(lambda: blocks_all_free(slow), "all blocks are free")


def test_a_tenants_queue_cap_answers_429_and_leaves_others_alone(slow, keys):
    assert set_limits(slow, "heavy", max_concurrent_requests=1).status_code == 200
    try:
        held = hold_the_running_slot(slow, keys["heavy"])
        try:
            with slow.client(keys["heavy"]) as c:
                r = c.post("/v1/generate", json=SHORT)
                assert r.status_code == 429 and r.headers["retry-after"] == "1"
                assert "1 requests queued or running; its limit is 1" in r.json()["error"]["message"]
                s = c.post("/v1/chat/completions", json={"model": "tiny-llama", "stream": True,
                                                         "messages": [{"role": "user", "content": "hi"}]})
                assert s.status_code == 429  # refused with a status code, not mid-stream
            light = Background(slow, keys["light"])
            light.post(SHORT)
        finally:
            release(held)
        assert light.join() == [200]
        with slow.client(keys["heavy"]) as c:  # its slot came back when the stream ended
            wait_until(lambda: c.post("/v1/generate", json=SHORT).status_code == 200, "heavy is admitted again")
    finally:
        assert set_limits(slow, "heavy").status_code == 200  # back to the defaults


def test_a_tenants_token_rate_answers_429_with_retry_after(slow, keys):
    assert set_limits(slow, "rated", tokens_per_minute=60, burst_tokens=40).status_code == 200
    body = {"prompt": [5, 6, 7, 8], "max_tokens": 16}  # costs 20 tokens (prompt + max_tokens)
    with slow.client(keys["rated"]) as c:
        assert c.post("/v1/generate", json=body).status_code == 200
        assert c.post("/v1/generate", json=body).status_code == 200
        r = c.post("/v1/generate", json=body)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        assert "60 tokens per minute" in r.json()["error"]["message"]
        assert 1 <= int(r.headers["retry-after"]) <= 20
        big = c.post("/v1/generate", json={"prompt": [5, 6], "max_tokens": 50})
        assert big.status_code == 400 and "at most 40 at once" in big.json()["error"]["message"]
    with slow.client(keys["light"]) as c:
        assert c.post("/v1/generate", json=body).status_code == 200


def test_storage_quota_at_upload_and_in_the_listings(slow, keys, vocab):
    adapter = make_adapter(vocab, num_virtual_tokens=4, seed=1)
    longer = make_adapter(vocab, num_virtual_tokens=8, seed=2)
    with slow.client(keys["storer"]) as c:
        first = upload(c, "p1", adapter.zip_bytes)
        assert first.status_code == 201
        size = first.json()["bytes"]
        assert set_limits(slow, "storer", max_prefixes=1, max_storage_bytes=size).status_code == 200
        r = upload(c, "p2", adapter.zip_bytes)
        assert r.status_code == 403 and r.json()["error"]["type"] == "quota_exceeded"
        assert "stores 1 prefixes; its quota is 1" in r.json()["error"]["message"]
        assert [p["id"] for p in c.get("/v1/prefixes").json()["data"]] == ["p1"]  # nothing stored
        assert upload(c, "p1", make_adapter(vocab, 4, seed=3).zip_bytes).status_code == 200  # same size: fine
        r = upload(c, "p1", longer.zip_bytes)
        assert r.status_code == 403 and f"its quota is {size} bytes" in r.json()["error"]["message"]
        listing = c.get("/v1/prefixes").json()
        assert listing["storage"] == {"bytes": size, "prefixes": 1, "max_storage_bytes": size, "max_prefixes": 1}
        job = c.post("/v1/users/bob/personalize", json={"examples": [{"prompt": "a", "completion": "b"}],
                                                        "steps": 1})
        assert job.status_code == 403 and "max_prefixes" in job.json()["error"]["message"]  # refused before queueing
    with slow.client(ADMIN_KEY) as admin:
        info = admin.get("/v1/admin/tenants/storer").json()
        assert info["storage"]["prefixes"] == 1 and info["overrides"] == {"max_prefixes": 1, "max_storage_bytes": size}
        assert info["limits"]["max_concurrent_requests"] == slow.settings.tenant_max_concurrent_requests
        listed = admin.get("/v1/admin/tenants").json()
        assert {t["tenant_id"]: t["storage"]["bytes"] for t in listed["tenants"]}["storer"] == size


def test_admin_limits_routes_check_their_input(slow, keys):
    with slow.client(ADMIN_KEY) as admin:
        assert admin.put("/v1/admin/tenants/light/limits", json={"max_gpus": 1}).status_code == 400
        r = admin.put("/v1/admin/tenants/light/limits", json={"tokens_per_minute": -5})
        assert r.status_code == 400 and "tokens_per_minute" in r.json()["error"]["message"]
        assert admin.put("/v1/admin/tenants/nobody/limits", json={}).status_code == 404
        assert admin.get("/v1/admin/tenants/nobody").status_code == 404
        assert admin.put("/v1/admin/tenants/admin/limits", json={"max_prefixes": 1}).status_code == 400
    with slow.client(keys["light"]) as c:
        assert c.put("/v1/admin/tenants/light/limits", json={"max_prefixes": 10**9}).status_code == 403
