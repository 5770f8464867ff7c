"""Two `prefix-serve serve` processes on one real Redis Cluster (three masters, a replica
each): what one replica uploads, replaces, deletes or queues, the other sees at once; a key
rotated or a tenant deleted through one stops working on the other."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api.harness import make_adapter, peft_greedy, upload
from tests.observability.conftest import PROMPT
from tests.observability.server_process import ServerProcess, save_tiny_model
from tests.observability.test_replicas import MAX_TOKENS, generate, wait_host_prefixes, wait_status


@pytest.fixture(scope="module")
def cluster_replicas(redis_cluster, vocab, tokenizer, tmp_path_factory) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    work = tmp_path_factory.mktemp("cluster-replicas")
    model = save_tiny_model(Path(work) / "tiny-llama", vocab, tokenizer)
    a = ServerProcess(model, redis_cluster.url, work, "cluster-a")
    b = ServerProcess(model, redis_cluster.url, work, "cluster-b")
    try:
        a.start(), b.start()
        a.wait_ready(), b.wait_ready()
        yield a, b
    finally:
        a.stop()
        b.stop()


def test_uploads_deletions_and_jobs_through_one_replica_reach_the_other(cluster_replicas, vocab):
    a, b = cluster_replicas
    with a.client() as c:
        r = c.post("/v1/admin/tenants", json={"tenant_id": "clustered"})
        assert r.status_code == 201, r.text
        key = r.json()["api_key"]
    v1, v2 = make_adapter(vocab, 5, seed=31), make_adapter(vocab, 6, seed=32)
    want_v1, want_v2 = peft_greedy(v1, PROMPT, MAX_TOKENS), peft_greedy(v2, PROMPT, MAX_TOKENS)
    assert want_v1 != want_v2

    with a.client(key) as c:
        r = upload(c, "bot", v1.zip_bytes)
    assert r.status_code == 201, r.text
    status, body = generate(b, key, "bot")
    assert status == 200, body
    assert body["prefix"] == [{"id": "bot", "version": r.json()["version"]}] and body["token_ids"] == want_v1

    with a.client(key) as c:
        r = upload(c, "bot", v2.zip_bytes)
    assert r.status_code == 200, r.text
    assert wait_host_prefixes(b, 0) == 0, f"B kept the replaced version:\n{b.log_tail()}"
    status, body = generate(b, key, "bot")
    assert status == 200 and body["token_ids"] == want_v2, body

    with a.client(key) as c:
        assert c.delete("/v1/prefixes/bot").status_code == 204
    assert wait_host_prefixes(b, 0) == 0, f"B kept the deleted prefix:\n{b.log_tail()}"
    assert generate(b, key, "bot")[0] == 404

    # a personalization job queued through A is visible (and cancellable) through B
    with a.client(key) as c:
        r = c.post("/v1/users/ada/personalize", json={"examples": [{"prompt": "hi", "completion": " there"}],
                                                      "steps": 1})
    assert r.status_code in (200, 201, 202), r.text
    job_id = r.json()["job_id"]
    with b.client(key) as c:
        assert c.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
        assert c.delete(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"


@pytest.mark.parametrize("revoke", ["rotate", "delete"])
def test_a_revoked_key_stops_working_on_the_other_replica(cluster_replicas, revoke):
    a, b = cluster_replicas
    tenant = f"cluster-revoked-{revoke}"
    with a.client() as c:
        key = c.post("/v1/admin/tenants", json={"tenant_id": tenant}).json()["api_key"]
    for _ in range(3):
        with b.client(key) as c:
            assert c.get("/v1/prefixes").status_code == 200
    with a.client() as c:
        r = c.post(f"/v1/admin/tenants/{tenant}/rotate-key") if revoke == "rotate" else c.delete(
            f"/v1/admin/tenants/{tenant}")
        assert r.status_code in (200, 204), r.text
    status, seconds = wait_status(b, key, 401)
    assert status == 401, f"B still accepts the old key after {seconds:.1f} s:\n{b.log_tail()}"
    print(f"old key refused by the other replica after {seconds * 1000:.0f} ms (cluster)")
