"""Tenants and keys: isolation (404, never 403), admin routes, auth errors, JSON errors."""

from __future__ import annotations

import hashlib

import openai
import pytest
import redis

from tests.api.harness import ADMIN_KEY, upload


@pytest.fixture(scope="module")
def keys(stack) -> dict[str, str]:
    return {"a": stack.create_tenant("tenant-a"), "b": stack.create_tenant("tenant-b")}


@pytest.fixture(scope="module")
def b_secret(stack, keys, adapters) -> dict:
    with stack.client(keys["b"]) as c:
        r = upload(c, "secret", adapters[0].zip_bytes)
    assert r.status_code == 201
    return r.json()


def test_tenant_cannot_list_read_use_or_delete_another_tenants_prefix(stack, keys, b_secret):
    with stack.client(keys["a"]) as a:
        assert "secret" not in {p["id"] for p in a.get("/v1/prefixes").json()["data"]}
        for r in (a.get("/v1/prefixes/secret"), a.delete("/v1/prefixes/secret"),
                  a.post("/v1/generate", json={"prefix_id": "secret", "prompt": "hello"}),
                  a.post("/v1/chat/completions",
                         json={"model": "secret", "messages": [{"role": "user", "content": "x"}]})):
            assert r.status_code == 404, r.text
            assert r.json()["error"]["type"] == "not_found_error"
            assert "secret" in r.json()["error"]["message"]
        assert "secret" not in {m["id"] for m in a.get("/v1/models").json()["data"]}
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=f"{stack.url}/v1", api_key=keys["a"], max_retries=0).chat.completions.create(
            model="secret", messages=[{"role": "user", "content": "x"}])
    # B's prefix is untouched by all of that
    with stack.client(keys["b"]) as b:
        assert b.get("/v1/prefixes/secret").json()["version"] == b_secret["version"]


def test_tenant_upload_under_the_same_id_does_not_replace_another_tenants(stack, keys, b_secret, adapters):
    with stack.client(keys["a"]) as a:
        r = upload(a, "secret", adapters[1].zip_bytes)
        assert r.status_code == 201  # created in A's own namespace, not "replaced"
        a_version = r.json()["version"]
        used = a.post("/v1/generate", json={"prefix_id": "secret", "prompt": "hello", "max_tokens": 2}).json()
        assert used["prefix"] == [{"id": "secret", "version": a_version}]
    with stack.client(keys["b"]) as b:
        assert b.get("/v1/prefixes/secret").json()["version"] == b_secret["version"]
        used = b.post("/v1/generate", json={"prefix_id": "secret", "prompt": "hello", "max_tokens": 2}).json()
        assert used["prefix"] == [{"id": "secret", "version": b_secret["version"]}]
    assert a_version != b_secret["version"]
    with stack.client(keys["a"]) as a:
        assert a.delete("/v1/prefixes/secret").status_code == 204
        assert a.get("/v1/prefixes/secret").status_code == 404
    with stack.client(keys["b"]) as b:
        assert b.get("/v1/prefixes/secret").status_code == 200


def test_keys_are_checked(stack, keys):
    with stack.client(None) as anon:
        r = anon.get("/v1/prefixes")
        assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]["message"]
    with stack.client("ps-" + "x" * 32) as wrong:
        r = wrong.post("/v1/generate", json={"prompt": "hi"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with stack.client(keys["a"]) as a:
        r = a.post("/v1/admin/tenants", json={"tenant_id": "sneaky"})
        assert r.status_code == 403 and "admin" in r.json()["error"]["message"]
    with stack.client(ADMIN_KEY) as admin:
        assert "sneaky" not in admin.get("/v1/admin/tenants").json()["data"]


def test_admin_creates_lists_and_deletes_tenants(stack):
    with stack.client(ADMIN_KEY) as admin:
        r = admin.post("/v1/admin/tenants", json={"tenant_id": "initech"})
        assert r.status_code == 201
        key = r.json()["api_key"]
        assert r.json()["tenant_id"] == "initech" and len(key) > 20
        assert admin.post("/v1/admin/tenants", json={"tenant_id": "initech"}).status_code == 409
        assert admin.post("/v1/admin/tenants", json={"tenant_id": "admin"}).status_code == 409
        bad = admin.post("/v1/admin/tenants", json={"tenant_id": "Not Valid!"})
        assert bad.status_code == 400 and "tenant id" in bad.json()["error"]["message"]
        assert "initech" in admin.get("/v1/admin/tenants").json()["data"]
    with stack.client(key) as t:
        assert t.get("/v1/prefixes").json()["data"] == []
    with stack.client(ADMIN_KEY) as admin:
        assert admin.delete("/v1/admin/tenants/initech").status_code == 204
        assert admin.delete("/v1/admin/tenants/initech").status_code == 404
    with stack.client(key) as t:  # the key stops working at once on this server
        assert t.get("/v1/prefixes").status_code == 401


def test_admin_rotates_a_tenants_key(stack, adapters):
    with stack.client(ADMIN_KEY) as admin:
        old = admin.post("/v1/admin/tenants", json={"tenant_id": "rotated"}).json()["api_key"]
    with stack.client(old) as t:
        assert upload(t, "kept", adapters[0].zip_bytes).status_code == 201
        assert t.get("/v1/prefixes").status_code == 200  # remembered by the server now
    with stack.client(old) as t:
        r = t.post("/v1/admin/tenants/rotated/rotate-key")
        assert r.status_code == 403  # only the admin rotates
    with stack.client(ADMIN_KEY) as admin:
        r = admin.post("/v1/admin/tenants/rotated/rotate-key")
        assert r.status_code == 200, r.text
        new = r.json()["api_key"]
        assert r.json()["tenant_id"] == "rotated" and new != old and new.startswith("ps-")
        assert admin.post("/v1/admin/tenants/nobody/rotate-key").status_code == 404
        r = admin.post("/v1/admin/tenants/admin/rotate-key")
        assert r.status_code == 400 and "PREFIX_SERVE_ADMIN_KEY" in r.json()["error"]["message"]
    with stack.client(old) as t:
        assert t.get("/v1/prefixes").status_code == 401
    with stack.client(new) as t:  # same tenant: its prefixes stay
        assert [p["id"] for p in t.get("/v1/prefixes").json()["data"]] == ["kept"]
    # the store keeps hashes only: neither key appears in Redis
    with redis.Redis.from_url(stack.store.redis_url) as raw:
        directory = raw.hgetall(stack.store.keys.tenants()) | raw.hgetall(stack.store.keys.api_keys())
    stored = b" ".join(k + b" " + v for k, v in directory.items())
    assert old.encode() not in stored and new.encode() not in stored
    assert hashlib.sha256(new.encode()).hexdigest().encode() in stored


def test_every_error_is_json_with_type_and_message(stack, keys):
    with stack.client(keys["a"]) as a:
        cases = {
            404: a.get("/v1/no-such-route"),
            405: a.delete("/v1/generate"),
            400: a.post("/v1/generate", json={"prompt": "hi", "max_tokens": 0}),
        }
        both = a.post("/v1/generate", json={"prompt": "hi", "messages": [{"role": "user", "content": "x"}]})
        typo = a.post("/v1/generate", json={"prompt": "hi", "max_token": 3})
        too_long = a.post("/v1/generate", json={"prompt": "hi", "max_tokens": 5000})
        bad_token = a.post("/v1/generate", json={"prompt": [1, 2, 999999], "max_tokens": 2})
        not_json = a.post("/v1/generate", content=b"{not json", headers={"content-type": "application/json"})
    for status, r in cases.items():
        assert r.status_code == status, r.text
        assert set(r.json()["error"]) == {"type", "message"}
    assert "max_tokens" in cases[400].json()["error"]["message"]
    assert both.status_code == 400 and "exactly one of 'prompt' and 'messages'" in both.json()["error"]["message"]
    assert typo.status_code == 400 and "max_token" in typo.json()["error"]["message"]
    assert too_long.status_code == 400 and "context" in too_long.json()["error"]["message"]
    assert bad_token.status_code == 400 and "999999" in bad_token.json()["error"]["message"]
    assert not_json.status_code == 400 and "error" in not_json.json()


def test_only_what_the_admin_marks_shared_is_shared_and_never_a_user_prefix(stack, keys, adapters):
    with stack.client(ADMIN_KEY) as admin:
        assert upload(admin, "internal", adapters[0].zip_bytes).status_code in (200, 201)  # not shared
        assert upload(admin, "user:dave", adapters[0].zip_bytes, shared="true").status_code in (200, 201)
    with stack.client(keys["a"]) as a:
        for name in ("shared/internal", "shared/user:dave"):
            r = a.post("/v1/generate", json={"prefix_id": name, "prompt": "hello", "max_tokens": 1})
            assert r.status_code == 404, r.text
            r = a.post("/v1/users/erin/personalize", json={"examples": [{"prompt": "a", "completion": "b"}],
                                                           "base_prefix_id": name, "steps": 1})
            assert r.status_code == 404, r.text
        # a tenant cannot share its own prefixes
        r = upload(a, "mine", adapters[0].zip_bytes, shared="true")
        assert r.status_code == 403 and "only the admin" in r.json()["error"]["message"]
        assert a.get("/v1/prefixes/mine").status_code == 404


def test_the_admin_tenant_cannot_be_deleted_and_its_prefixes_stay(stack, adapters):
    with stack.client(ADMIN_KEY) as admin:
        assert upload(admin, "keep-me", adapters[0].zip_bytes, shared="true").status_code in (200, 201)
        r = admin.delete("/v1/admin/tenants/admin")
        assert r.status_code == 400 and "cannot be deleted" in r.json()["error"]["message"]
        assert admin.get("/v1/prefixes/keep-me").status_code == 200


def test_error_bodies_cut_long_ids(stack, keys):
    long_id = "x" * 10_000
    with stack.client(keys["a"]) as a:
        for r in (a.get(f"/v1/prefixes/{long_id}"), a.get(f"/v1/jobs/{long_id}"),
                  a.post("/v1/generate", json={"prefix_id": long_id, "prompt": "x"}),
                  a.post(f"/v1/users/{long_id}/personalize", json={"examples": [{"prompt": "a", "completion": "b"}]})):
            assert r.status_code in (400, 404), r.text
            assert len(r.text) < 600 and "10000 characters" in r.text, r.text[:300]
