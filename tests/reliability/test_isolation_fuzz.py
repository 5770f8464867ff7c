"""Tenant isolation under fuzzing: a tenant's key, aimed at every route with another tenant's
prefix ids, user ids and job ids (as they are, and bent: case, dots, slashes, encodings,
`shared/`, `user:`, Redis key syntax and glob characters), and with keys close to the
other tenant's, never reads, uses, changes or even learns of the other tenant's prefixes
or jobs. Afterwards the victim's prefixes and jobs are exactly as they were.
"""

from __future__ import annotations

import json
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.api.harness import MODEL_NAME
from tests.reliability.conftest import SCALE, VICTIM, World, check_answer

BENDS = [lambda s: s, str.upper, lambda s: s + ".", lambda s: s + "/", lambda s: "shared/" + s,
         lambda s: "user:" + s, lambda s: f"../{VICTIM}/" + s, lambda s: "%2e%2e%2f" + s, lambda s: "{t:" + VICTIM + "}:" + s,
         lambda s: f"{VICTIM}:" + s, lambda s: s + "*", lambda s: s[:-1] + "?", lambda s: s.replace("e", "е"),  # Cyrillic e
         lambda s: s + "\x00", lambda s: " " + s]


def bent(ids: list[str]):
    return st.builds(lambda i, b: b(i), st.sampled_from(ids), st.sampled_from(BENDS))


def near_keys(key: str) -> list[str]:
    return [key[:-1], key + "x", key.upper(), key[:-1] + chr(ord(key[-1]) ^ 1), "ps-" + key[3:][::-1], key[:20]]


@settings(max_examples=300 * SCALE, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_tenant_never_reaches_another_tenants_prefixes_or_jobs(world: World, data):
    victim_ids = list(world.victim_prefixes) + ["bob", "carol"]
    name = data.draw(bent(victim_ids), "id")
    job_id = data.draw(st.one_of(st.sampled_from(world.victim_jobs), bent(world.victim_jobs)), "job")
    route = data.draw(st.sampled_from(["get", "delete", "put", "generate", "openai", "chat", "user", "job", "cancel",
                                       "base", "admin", "near-key"]), "route")
    key = world.attacker_key
    enc = quote(name, safe="/%:", errors="surrogatepass")
    with world.stack.client(key, timeout=60) as c:
        if route == "get":
            r = c.get(f"/v1/prefixes/{enc}")
        elif route == "delete":
            r = c.delete(f"/v1/prefixes/{enc}")
        elif route == "put":
            r = c.put(f"/v1/prefixes/{enc}", files={"file": ("p.safetensors", b"\0" * 16)})
        elif route == "generate":
            r = c.post("/v1/generate", json={"prefix_id": name, "prompt": "hi", "max_tokens": 2})
        elif route == "openai":
            r = c.post("/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 2})
        elif route == "chat":
            r = c.post("/v1/chat/completions", json={"model": MODEL_NAME, "user_id": name, "max_tokens": 2,
                                                     "messages": [{"role": "user", "content": "hi"}]})
        elif route == "user":
            r = c.post("/v1/generate", json={"user_id": name, "prompt": "hi", "max_tokens": 2})
        elif route == "job":
            r = c.get(f"/v1/jobs/{quote(job_id, safe='/%', errors='surrogatepass')}")
        elif route == "cancel":
            r = c.delete(f"/v1/jobs/{quote(job_id, safe='/%', errors='surrogatepass')}")
        elif route == "base":
            r = c.post("/v1/users/eve/personalize", json={"examples": [{"prompt": "a", "completion": "b"}],
                                                          "base_prefix_id": name, "steps": 1})
        elif route == "admin":
            r = c.request(data.draw(st.sampled_from(["GET", "DELETE"])), f"/v1/admin/tenants/{VICTIM}")
        else:
            wrong = data.draw(st.sampled_from(near_keys(world.victim_key)))
            r = c.get("/v1/prefixes", headers={"Authorization": f"Bearer {wrong}"})
    # never a success on the victim's things: 404 (not found: existence is not revealed),
    # 400 (not an id at all), 401/403/405; a PUT only ever creates the attacker's own prefix
    # (307: the router's redirect of a trailing slash to the same path without it)
    allowed = {307, 400, 401, 403, 404, 405, 413, 415, 422}
    assert r.status_code in allowed, (route, name, job_id, r.status_code, r.text[:300])
    problems = check_answer(r.status_code, r.headers.get("content-type", ""), r.text,
                            world.secrets - {world.attacker_key}, world.stack.store.keys.namespace,
                            sent=name + job_id + (VICTIM if route == "admin" else ""))
    assert not problems, (route, name, problems, r.text[:300])


def test_the_victim_is_exactly_as_before(world: World):
    # runs after the fuzzing above (same module, same world)
    stack = world.stack
    assert {r.prefix_id: r.version for r in stack.store.list(VICTIM)} == world.victim_prefixes
    for job_id in world.victim_jobs:
        job = stack.ctx.jobs.get(VICTIM, job_id)
        assert job.status.value == "queued" and not job.cancel_requested, job
    with stack.client(world.attacker_key) as c:
        mine = json.dumps(c.get("/v1/prefixes").json())
        models = json.dumps(c.get("/v1/models").json())
    for secret in world.secrets - {world.attacker_key}:
        assert secret not in mine and secret not in models
