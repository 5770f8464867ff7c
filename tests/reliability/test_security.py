"""The security review's checks that are not fuzzing (docs/security.md is the threat model):
the admin audit log, constant-time key checks, error bodies with Redis away, and a
non-loopback bind without an admin key."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import subprocess
import sys

import httpx
import pytest

from prefix_store.audit import AuditLog
from prefix_store.redis_process import RedisServer
from server.api import auth
from tests.api.harness import ADMIN_KEY, make_adapter, start_stack, upload
from tests.reliability.conftest import REPO, leaks


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def test_admin_actions_are_audited_who_what_when_and_kept(redis_server, vocab, tokenizer, caplog):
    caplog.set_level(logging.INFO, logger="prefix_serve.audit")
    stack = start_stack(redis_server.url, vocab, tokenizer)
    try:
        with stack.client(ADMIN_KEY) as admin:
            key = admin.post("/v1/admin/tenants", json={"tenant_id": "audited"}).json()["api_key"]
            assert upload(admin, "house-style", make_adapter(vocab, 4, seed=3).zip_bytes, shared="true"
                          ).status_code == 201
            assert admin.delete("/v1/admin/tenants/nobody").status_code == 404
        with stack.client(key) as tenant:
            assert tenant.post("/v1/admin/tenants", json={"tenant_id": "sneaky"}).status_code == 403
            assert tenant.get("/v1/admin/audit").status_code == 403
            assert upload(tenant, "own", make_adapter(vocab, 4, seed=4).zip_bytes).status_code == 201  # not audited
        with stack.client("ps-" + "x" * 32) as stranger:
            assert stranger.delete("/v1/admin/tenants/audited").status_code == 401
        with stack.client(ADMIN_KEY) as admin:
            assert admin.delete("/v1/admin/tenants/audited").status_code == 204
            page = admin.get("/v1/admin/audit", params={"limit": 4}).json()
            rest = admin.get("/v1/admin/audit", params={"limit": 100, "before": page["next"]}).json()
            assert admin.get("/v1/admin/audit", params={"before": "0-0; FLUSHALL"}).status_code == 400
        entries = page["data"] + rest["data"]
        got = [(e["actor"], e["key_id"], e["action"], e["target"], e["status"]) for e in entries]
        assert got == [  # newest first
            ("admin", key_id(ADMIN_KEY), "DELETE /v1/admin/tenants/{tenant_id}", "audited", 204),
            ("", key_id("ps-" + "x" * 32), "DELETE /v1/admin/tenants/{tenant_id}", "audited", 401),
            ("audited", key_id(key), "GET /v1/admin/audit", "", 403),
            ("audited", key_id(key), "POST /v1/admin/tenants", "", 403),  # refused before its body was read
            ("admin", key_id(ADMIN_KEY), "DELETE /v1/admin/tenants/{tenant_id}", "nobody", 404),
            ("admin", key_id(ADMIN_KEY), "PUT /v1/prefixes/{prefix_id}", "house-style", 201),
            ("admin", key_id(ADMIN_KEY), "POST /v1/admin/tenants", "audited", 201),
        ]
        assert page["next"] == entries[3]["id"] and rest["next"] is None
        times = [e["time"] for e in entries]
        assert times == sorted(times, reverse=True) and all(e["client"] == "127.0.0.1" for e in entries)
        # stored in Redis (a capped stream), not in this process: another reader sees the same
        stored = AuditLog(redis_server.url, stack.store.keys.namespace).read(100)
        reads = [(e.action, e.status) for e in stored[:3]]  # the three reads above, recorded once answered
        assert reads == [("GET /v1/admin/audit", 400), ("GET /v1/admin/audit", 200), ("GET /v1/admin/audit", 200)]
        assert [e.id for e in stored][3:] == [e["id"] for e in entries]
        # and as one JSON log line each; no key in either
        lines = [r.getMessage() for r in caplog.records if r.name == "prefix_serve.audit"]
        assert len(lines) == len(stored)
        everything = str(entries) + "".join(lines)
        assert ADMIN_KEY not in everything and key not in everything
    finally:
        stack.stop()


def test_key_checks_compare_fixed_length_digests_in_constant_time(monkeypatch):
    """Whatever key is sent (a prefix of the admin key, the key with one more character, a
    megabyte), the admin check is one hmac.compare_digest of two sha256 hex digests; tenant
    keys are looked up by their sha256 (Redis holds only that), never compared as text."""
    calls = []
    real = hmac.compare_digest

    def recording(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", recording)

    class Store:
        looked_up = []

        def tenant_for_key(self, key):
            self.looked_up.append(key)
            return None

    authenticator = auth.Authenticator(Store(), ADMIN_KEY)
    import asyncio

    for sent in (ADMIN_KEY[:1], ADMIN_KEY[:-1], ADMIN_KEY + "x", "x" * (1 << 20), ADMIN_KEY.upper()):
        with pytest.raises(auth.ApiError):
            asyncio.run(authenticator.authenticate(f"Bearer {sent}"))
    assert calls == [(64, 64)] * 5
    assert asyncio.run(authenticator.authenticate(f"Bearer {ADMIN_KEY}")).is_admin
    from prefix_store.tenants import key_hash

    assert key_hash("ps-abc") == hashlib.sha256(b"ps-abc").hexdigest()  # the stored form


def test_error_bodies_with_redis_away_name_no_address_path_or_key(vocab, tokenizer):
    redis = RedisServer().start()
    stack = start_stack(redis.url, vocab, tokenizer)
    try:
        key = stack.create_tenant("acme")
        adapter = make_adapter(vocab, 4, seed=8)
        redis.stop()
        with stack.client(key) as c, stack.client(ADMIN_KEY) as admin:
            answers = [
                c.post("/v1/generate", json={"prefix_id": "cold", "prompt": "hi", "max_tokens": 2}),
                upload(c, "new", adapter.zip_bytes), c.get("/v1/prefixes"), c.get("/v1/prefixes/x"),
                c.delete("/v1/prefixes/x"), c.get("/v1/jobs/job-" + "0" * 32), c.get("/v1/models"),
                c.post("/v1/users/ada/personalize", json={"examples": [{"prompt": "a", "completion": "b"}]}),
                admin.post("/v1/admin/tenants", json={"tenant_id": "new"}), admin.get("/v1/admin/tenants"),
                admin.get("/v1/admin/audit"), c.get("/ready"),
            ]
        secrets = {ADMIN_KEY, key, str(redis.port), str(redis.datadir)}
        for r in answers:
            assert r.status_code == 503, (r.request.url, r.status_code, r.text)
            assert not leaks(r.text, secrets, stack.store.keys.namespace), (r.request.url, r.text)
    finally:
        stack.stop()
        redis.close()


def test_a_non_loopback_bind_without_an_admin_key_starts_nothing(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "admin_key").write_text("psa-a-key-saved-by-an-earlier-local-run\n")  # not a configured key
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFIX_SERVE_")}
    for host in ("0.0.0.0", "::"):
        proc = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--host", host, "--cache-dir", str(cache)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "admin key is required" in proc.stderr
    assert sorted(p.name for p in cache.iterdir()) == ["admin_key"]  # no redis-server was started


def test_openapi_document_names_no_internal_detail(redis_server, vocab, tokenizer):
    stack = start_stack(redis_server.url, vocab, tokenizer)
    try:
        doc = httpx.get(f"{stack.url}/openapi.json").text
        assert not leaks(doc, {ADMIN_KEY}, stack.store.keys.namespace)
    finally:
        stack.stop()
