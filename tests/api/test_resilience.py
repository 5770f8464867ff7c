"""The server under stress: Redis going away and coming back, a full queue (429), clients
that disconnect (their requests aborted, blocks freed), request timeouts, and a request
that keeps its prefix version while the prefix is replaced.

The engine here is slowed by a hook (10 ms a step) so that a long request is surely still
running while the test acts on it; nothing asserts on time.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from prefix_store import RedisServer
from tests.api.harness import Stack, make_adapter, peft_greedy, sse_events, start_stack, upload

LONG = {"prompt": "the quick brown fox", "max_tokens": 200, "ignore_eos": True}


def wait_until(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def blocks_all_free(stack: Stack) -> bool:
    s = stack.engine.stats()
    return s.num_running == 0 and s.kv_blocks_free + s.kv_blocks_used_by_prefixes == s.kv_blocks_total


@pytest.fixture(scope="module")
def slow(redis_server, vocab, tokenizer) -> Iterator[Stack]:
    """One request runs at a time, one may wait; the 2nd waiting one gets 429."""
    s = start_stack(redis_server.url, vocab, tokenizer, slow_step_s=0.05, max_num_seqs=1, max_queue=1)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def slow_key(slow) -> str:
    return slow.create_tenant("acme")


def test_full_queue_gets_429_with_retry_after(slow, slow_key):
    waiting_result: list[httpx.Response] = []
    with slow.client(slow_key) as c, slow.client(slow_key) as other:
        with c.stream("POST", "/v1/generate", json={**LONG, "stream": True}) as running:
            lines = running.iter_lines()  # keep a reference: a collected iterator closes the connection
            next(line for line in lines if line.startswith("data: {"))  # it holds the only slot
            waiter = threading.Thread(target=lambda: waiting_result.append(
                other.post("/v1/generate", json={"prompt": "hello", "max_tokens": 2})))
            waiter.start()
            wait_until(lambda: slow.engine.num_waiting == 1, "the second request waits")
            r = c.post("/v1/generate", json={"prompt": "hello", "max_tokens": 2})
            assert r.status_code == 429
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
            s = c.post("/v1/chat/completions", json={"model": "tiny-llama", "stream": True,
                                                     "messages": [{"role": "user", "content": "hi"}]})
            assert s.status_code == 429  # a stream is refused with a status code too, not mid-stream
        waiter.join(60)
    assert waiting_result[0].status_code == 200  # it ran once the long one was gone
    wait_until(lambda: blocks_all_free(slow), "all blocks are free")


def test_disconnect_aborts_the_request_and_frees_its_blocks(slow, slow_key):
    before = slow.engine.stats().generated_tokens
    with slow.client(slow_key) as c:
        with c.stream("POST", "/v1/generate", json={**LONG, "stream": True}) as running:
            lines = running.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            assert slow.engine.stats().num_running == 1
            # a non-streaming client that gives up while waiting for the slot
            with slow.client(slow_key, timeout=httpx.Timeout(60, read=0.5)) as impatient:
                with pytest.raises(httpx.ReadTimeout):
                    impatient.post("/v1/generate", json={"prompt": "hello", "max_tokens": 50})
            wait_until(lambda: slow.engine.num_waiting == 0, "the abandoned request left the queue")
            stats = slow.engine.stats()
            assert stats.num_running == 1 and stats.generated_tokens - before < 200  # the stream still runs
        # leaving the block closes the stream's connection
        wait_until(lambda: blocks_all_free(slow), "the stream's blocks are free")
    assert slow.engine.stats().generated_tokens - before < 200  # aborted, not run to the end
    assert slow.engine.stats().num_waiting == 0


def test_timeout_aborts_with_504(redis_server, vocab, tokenizer):
    stack = start_stack(redis_server.url, vocab, tokenizer, slow_step_s=0.01, request_timeout_s=0.3)
    try:
        key = stack.create_tenant("acme")
        with stack.client(key) as c:
            r = c.post("/v1/generate", json=LONG)
            assert r.status_code == 504
            assert "request_timeout_s=0.3" in r.json()["error"]["message"]
            with c.stream("POST", "/v1/generate", json={**LONG, "stream": True}) as s:
                events = sse_events(s)
            assert events[-2]["error"]["type"] == "timeout_error" and events[-1] == "[DONE]"
            assert sum(len(e.get("token_ids", [])) for e in events[:-2]) < 200
        wait_until(lambda: blocks_all_free(stack), "the timed-out requests' blocks are free")
    finally:
        stack.stop()


def test_running_request_finishes_on_the_version_it_started_with(slow, slow_key, vocab, tokenizer):
    old, new = make_adapter(vocab, 5, seed=31), make_adapter(vocab, 5, seed=32)
    ids = tokenizer(LONG["prompt"])["input_ids"]
    with slow.client(slow_key) as c:
        v1 = upload(c, "swap", old.zip_bytes).json()["version"]
        body = {"prefix_id": "swap", "prompt": LONG["prompt"], "max_tokens": 60, "stream": True}
        with c.stream("POST", "/v1/generate", json=body) as running:
            lines = running.iter_lines()
            first = json.loads(next(line for line in lines if line.startswith("data: {"))[6:])
            v2 = upload(c, "swap", new.zip_bytes).json()["version"]
            assert slow.engine.stats().num_running == 1  # replaced while it runs
            rest = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        after = c.post("/v1/generate", json={"prefix_id": "swap", "prompt": LONG["prompt"], "max_tokens": 6}).json()
    tokens = first["token_ids"] + [t for e in rest for t in e["token_ids"]]
    assert tokens == peft_greedy(old, ids, 60)
    assert rest[-1]["prefix"] == [{"id": "swap", "version": v1}]
    assert after["token_ids"] == peft_greedy(new, ids, 6)
    assert after["prefix"] == [{"id": "swap", "version": v2}]


def test_redis_down_serves_resident_prefixes_and_recovers(vocab, tokenizer, adapters):
    redis = RedisServer(appendonly=True).start()
    stack = start_stack(redis.url, vocab, tokenizer)
    try:
        key = stack.create_tenant("acme")
        ids = tokenizer("hello world")["input_ids"]
        warm_body = {"prefix_id": "warm", "prompt": "hello world", "max_tokens": 6}
        cold_body = {"prefix_id": "cold", "prompt": "hello world", "max_tokens": 6}
        with stack.client(key) as c:
            assert upload(c, "warm", adapters[0].zip_bytes).status_code == 201
            assert upload(c, "cold", adapters[1].zip_bytes).status_code == 201
            assert c.post("/v1/generate", json=warm_body).json()["token_ids"] == peft_greedy(adapters[0], ids, 6)

            redis.stop()
            r = c.post("/v1/generate", json=warm_body)
            assert r.status_code == 200, r.text
            assert r.json()["token_ids"] == peft_greedy(adapters[0], ids, 6)
            r = c.post("/v1/generate", json=cold_body)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert "unreachable" in r.json()["error"]["message"]
            assert c.get("/ready").status_code == 503
            assert c.get("/health").status_code == 200
            assert c.get("/v1/prefixes").status_code == 503
            assert upload(c, "new", adapters[2].zip_bytes).status_code == 503

            redis.start()  # same port, same data (append-only file); the server is not restarted
            wait_until(lambda: c.post("/v1/generate", json=cold_body).status_code == 200, "cold works again")
            assert c.post("/v1/generate", json=cold_body).json()["token_ids"] == peft_greedy(adapters[1], ids, 6)
            assert c.post("/v1/generate", json=warm_body).json()["token_ids"] == peft_greedy(adapters[0], ids, 6)
            assert c.get("/ready").status_code == 200
            assert {p["id"] for p in c.get("/v1/prefixes").json()["data"]} == {"warm", "cold"}
    finally:
        stack.stop()
        redis.close()


def test_a_write_no_replica_confirmed_is_a_503_that_says_so(redis_server, vocab, tokenizer, adapters):
    """--redis-wait-replicas 1 on a Redis without replicas: nothing is acknowledged."""
    stack = start_stack(redis_server.url, vocab, tokenizer, redis_wait_replicas=1, redis_wait_timeout_ms=50)
    try:
        with stack.client() as admin:
            for r in (upload(admin, "unconfirmed", adapters[0].zip_bytes),
                      admin.post("/v1/admin/tenants", json={"tenant_id": "unconfirmed"})):
                assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
                assert "reached 0 of the 1 Redis replica(s) required within 50 ms" in r.json()["error"]["message"]
            assert "rotate the tenant's key to get one" in r.json()["error"]["message"]  # the key is not shown
    finally:
        stack.stop()


def test_shutdown_drains_running_requests(redis_server, vocab, tokenizer):
    stack = start_stack(redis_server.url, vocab, tokenizer, slow_step_s=0.01)
    key = stack.create_tenant("acme")
    stopper = threading.Thread(target=stack.stop)
    try:
        with stack.client(key) as c:
            body = {**LONG, "max_tokens": 100, "stream": True}
            with c.stream("POST", "/v1/generate", json=body) as running:
                lines = running.iter_lines()
                events = [json.loads(next(line for line in lines if line.startswith("data: {"))[6:])]
                stopper.start()  # what SIGTERM does: stop accepting, let running requests finish
                wait_until(lambda: stack.server.server.should_exit, "shutdown began")
                assert stack.engine.stats().num_running == 1
                events += [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert sum(len(e["token_ids"]) for e in events) == 100
        assert events[-1]["finish_reason"] == "length"
    finally:
        if stopper.ident is None:
            stack.stop()
        else:
            stopper.join(60)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{stack.url}/health", timeout=2)
