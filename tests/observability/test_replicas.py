"""Two `prefix-serve serve` processes on one real Redis, as behind the load balancer: a
prefix uploaded, replaced or deleted through replica A is what replica B serves on its
next request, and B's host cache drops the stale copy as soon as the store's event
arrives, before any request asks B (pub/sub across processes). Then the shipped HAProxy
config in front of them: prefix affinity, and answers while one replica is down."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.harness import make_adapter, peft_greedy, upload
from tests.observability.conftest import PROMPT
from tests.observability.haproxy_process import HAProxy
from tests.observability.promql import scrape, value
from tests.observability.server_process import ServerProcess, save_tiny_model

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def replicas(redis_server, vocab, tokenizer, tmp_path_factory) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    work = tmp_path_factory.mktemp("replicas")
    model = save_tiny_model(Path(work) / "tiny-llama", vocab, tokenizer)
    a = ServerProcess(model, redis_server.url, work, "replica-a")
    b = ServerProcess(model, redis_server.url, work, "replica-b")
    try:
        a.start(), b.start()  # both load at once
        a.wait_ready(), b.wait_ready()
        yield a, b
    finally:
        a.stop()
        b.stop()


def generate(replica: ServerProcess, key: str, prefix: str) -> tuple[int, dict]:
    with replica.client(key) as c:
        r = c.post("/v1/generate", json={"prefix_id": prefix, "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                                         "ignore_eos": True})
    return r.status_code, r.json()


def host_prefixes(replica: ServerProcess) -> float:
    return value(scrape(replica.url), "prefix_serve_host_prefixes")


def wait_host_prefixes(replica: ServerProcess, want: float, timeout: float = 10.0) -> float:
    deadline = time.monotonic() + timeout
    while (got := host_prefixes(replica)) != want and time.monotonic() < deadline:
        time.sleep(0.05)
    return got


def test_prefix_changes_through_one_replica_reach_the_other(replicas, vocab):
    a, b = replicas
    with a.client() as c:
        r = c.post("/v1/admin/tenants", json={"tenant_id": "replicated"})
        assert r.status_code == 201, r.text
        key = r.json()["api_key"]
    v1, v2 = make_adapter(vocab, 5, seed=11), make_adapter(vocab, 7, seed=12)
    want_v1, want_v2 = peft_greedy(v1, PROMPT, MAX_TOKENS), peft_greedy(v2, PROMPT, MAX_TOKENS)
    assert want_v1 != want_v2, "the two adapters must answer differently for this test to mean anything"

    # uploaded through A, served by B (B's tenant key lookup also goes through the shared Redis)
    with a.client(key) as c:
        r = upload(c, "bot", v1.zip_bytes)
    assert r.status_code == 201, r.text
    version1 = r.json()["version"]
    status, body = generate(b, key, "bot")
    assert status == 200, body
    assert body["prefix"] == [{"id": "bot", "version": version1}]
    assert body["token_ids"] == want_v1
    assert host_prefixes(b) == 1

    # replaced through A: B's event subscription drops its copy of the old version at once...
    with a.client(key) as c:
        r = upload(c, "bot", v2.zip_bytes)
    assert r.status_code == 200, r.text
    version2 = r.json()["version"]
    assert version2 != version1
    assert wait_host_prefixes(b, 0) == 0, f"B kept the replaced version:\n{b.log_tail()}"
    # ...and B's next request serves the new one
    status, body = generate(b, key, "bot")
    assert status == 200, body
    assert body["prefix"] == [{"id": "bot", "version": version2}]
    assert body["token_ids"] == want_v2
    assert host_prefixes(b) == 1

    # deleted through A: B forgets it and answers 404
    with a.client(key) as c:
        assert c.delete("/v1/prefixes/bot").status_code == 204
    assert wait_host_prefixes(b, 0) == 0, f"B kept the deleted prefix:\n{b.log_tail()}"
    status, body = generate(b, key, "bot")
    assert status == 404, body
    assert body["error"]["type"] == "not_found_error"


def wait_status(replica: ServerProcess, key: str, want: int, timeout: float = 5.0) -> tuple[int, float]:
    """Ask `replica` with `key` until it answers `want` (bounded); (last status, seconds taken)."""
    start = time.monotonic()
    while True:
        with replica.client(key) as c:
            status = c.get("/v1/prefixes").status_code
        elapsed = time.monotonic() - start
        if status == want or elapsed > timeout:
            return status, elapsed
        time.sleep(0.01)


@pytest.mark.parametrize("revoke", ["rotate", "delete"])
def test_a_revoked_key_stops_working_on_the_other_replica(replicas, revoke):
    """B remembers a tenant key (30 s); rotated or deleted through A, it stops working on B
    as soon as B hears the store's tenant event, not 30 s later."""
    a, b = replicas
    tenant = f"revoked-{revoke}"
    with a.client() as c:
        key = c.post("/v1/admin/tenants", json={"tenant_id": tenant}).json()["api_key"]
    for _ in range(3):  # B has checked the key and remembers it
        with b.client(key) as c:
            assert c.get("/v1/prefixes").status_code == 200
    with a.client() as c:
        r = c.post(f"/v1/admin/tenants/{tenant}/rotate-key") if revoke == "rotate" else c.delete(
            f"/v1/admin/tenants/{tenant}")
        assert r.status_code in (200, 204), r.text
    status, seconds = wait_status(b, key, 401)
    assert status == 401, f"B still accepts the old key after {seconds:.1f} s:\n{b.log_tail()}"
    print(f"old key refused by the other replica after {seconds * 1000:.0f} ms")
    if revoke == "rotate":
        with b.client(r.json()["api_key"]) as c:  # the new key works there at once
            assert c.get("/v1/prefixes").status_code == 200


def test_tenant_limits_hold_across_replicas(replicas, vocab):
    """Limits set through B apply on A; tokens a tenant spent on A are spent on B too (one
    bucket in Redis: 429 with Retry-After there), while another tenant is not affected;
    the storage quota counts uploads through both."""
    a, b = replicas
    with a.client() as c:
        keys = {}
        for tenant in ("metered", "bystander"):
            r = c.post("/v1/admin/tenants", json={"tenant_id": tenant})
            assert r.status_code == 201, r.text
            keys[tenant] = r.json()["api_key"]
    with b.client() as c:
        r = c.put("/v1/admin/tenants/metered/limits", json={"tokens_per_minute": 60, "burst_tokens": 40,
                                                             "max_prefixes": 1})
        assert r.status_code == 200, r.text
    body = {"prompt": [5, 6, 7, 8], "max_tokens": 16, "ignore_eos": True}  # 20 tokens: prompt + max_tokens
    with a.client(keys["metered"]) as c:
        assert c.post("/v1/generate", json=body).status_code == 200
        assert c.post("/v1/generate", json=body).status_code == 200
    with b.client(keys["metered"]) as c:
        r = c.post("/v1/generate", json=body)
        assert r.status_code == 429, r.text
        assert int(r.headers["retry-after"]) >= 1 and "60 tokens per minute" in r.json()["error"]["message"]
    with b.client(keys["bystander"]) as c:
        assert c.post("/v1/generate", json=body).status_code == 200
    with a.client(keys["metered"]) as c:
        assert upload(c, "one", make_adapter(vocab, 4, seed=31).zip_bytes).status_code == 201
    with b.client(keys["metered"]) as c:
        r = upload(c, "two", make_adapter(vocab, 4, seed=32).zip_bytes)
        assert r.status_code == 403 and "its quota is 1" in r.json()["error"]["message"]
    with a.client() as c:
        info = c.get("/v1/admin/tenants/metered").json()
        assert info["storage"]["prefixes"] == 1 and info["overrides"]["tokens_per_minute"] == 60


def generate_counts(replicas: tuple[ServerProcess, ...]) -> list[float]:
    return [value(scrape(r.url), "prefix_serve_http_requests_total", route=route, status="200")
            for r in replicas for route in ("/v1/generate", "/v1/completions")]


def wait_counts(replicas: tuple[ServerProcess, ...], total: float, timeout: float = 10.0) -> list[float]:
    """Per replica (generate, completions) 200 counts, once they add up to `total` (a request
    is counted just after its last byte went out)."""
    deadline = time.monotonic() + timeout
    while sum(counts := generate_counts(replicas)) < total and time.monotonic() < deadline:
        time.sleep(0.05)
    return counts


@pytest.mark.skipif(not shutil.which("haproxy", path="/usr/sbin:/usr/bin:/sbin:/bin"),
                    reason="haproxy is not installed (apt-get install haproxy)")
def test_load_balancer_keeps_each_prefix_on_one_replica_and_survives_one_down(replicas, vocab):
    """docker/haproxy/haproxy.cfg as shipped (addresses aside): /v1/generate `prefix_id` and
    the OpenAI `model` hash to the same replica, every time; with that replica stopped,
    the other one answers."""
    a, b = replicas
    lb = HAProxy({"server-1": a.port, "server-2": b.port}).start()
    try:
        with a.client() as c:
            r = c.post("/v1/admin/tenants", json={"tenant_id": "balanced"})
            assert r.status_code == 201, r.text
            key = r.json()["api_key"]
        names = [f"lb-prefix-{i}" for i in range(6)]
        with httpx.Client(base_url=lb.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
            for i, name in enumerate(names):
                assert upload(c, name, make_adapter(vocab, 4, seed=20 + i).zip_bytes).status_code == 201
            total = sum(generate_counts(replicas))
            home: dict[str, int] = {}
            for name in names:
                before = wait_counts(replicas, total)
                for _ in range(3):
                    r = c.post("/v1/generate", json={"prefix_id": name, "prompt": PROMPT, "max_tokens": 2})
                    assert r.status_code == 200, r.text
                r = c.post("/v1/completions", json={"model": name, "prompt": PROMPT, "max_tokens": 2})
                assert r.status_code == 200, r.text
                total += 4
                after = wait_counts(replicas, total)
                delta = [x - y for x, y in zip(after, before)]
                # [a generate, a completions, b generate, b completions]: all four on one replica
                assert delta in ([3, 1, 0, 0], [0, 0, 3, 1]), f"{name}: {delta}"
                home[name] = 0 if delta[0] else 1

            # the replica that holds the first prefix goes down: the other one answers for it
            name = names[0]
            down = replicas[home[name]]
            down.stop()
            for _ in range(3):
                r = c.post("/v1/generate", json={"prefix_id": name, "prompt": PROMPT, "max_tokens": 2})
                assert r.status_code == 200, f"{r.status_code} {r.text}\n{lb.log_tail()}"
                assert r.json()["prefix"][0]["id"] == name
    finally:
        lb.stop()
