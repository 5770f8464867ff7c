"""Fuzzing every route from the server's own OpenAPI document with schemathesis: requests
that fit the schema and requests that break it, as a tenant, as the admin and without a
key. No answer may be a 5xx, hang, or leak; an error is always our JSON; afterwards the
server is alive and idle with every KV block free.

CI sends at least MIN_REQUESTS; PREFIX_SERVE_LONG_RUN=1 sends ten times as many.
"""

from __future__ import annotations

import logging
from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode

from tests.api.harness import ADMIN_KEY
from tests.reliability.conftest import SCALE, World, check_answer

EXAMPLES_PER_OPERATION = 30 * SCALE  # per operation, generation mode and caller
MIN_REQUESTS = 1000 * SCALE
TIMEOUT_S = 30.0  # an answer slower than this is a hang (a failure), not a timing check
UNDOCUMENTED = {"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}  # FastAPI's own pages


def route_table(routes):
    """(method, path) of every route, through included routers (none of ours has a path prefix)."""
    for r in routes:
        if hasattr(r, "original_router"):
            yield from route_table(r.original_router.routes)
        else:
            yield from ((m, r.path) for m in getattr(r, "methods", None) or () if m != "HEAD")


def test_fuzzing_every_route_finds_no_5xx_hang_or_leak(world: World, caplog):
    stack = world.stack
    caplog.set_level(logging.ERROR)
    schema = schemathesis.openapi.from_dict(httpx.get(f"{stack.url}/openapi.json").json())
    operations = [result.ok() for result in schema.get_all_operations()]
    documented = {(op.method.upper(), op.path) for op in operations}
    routes = {(m, path) for m, path in route_table(stack.server.server.config.app.routes) if path not in UNDOCUMENTED}
    assert documented == routes  # every route is in the document, so every route is fuzzed

    callers = {"tenant": world.attacker_key, "admin": ADMIN_KEY, "anonymous": None}
    sent: Counter = Counter()
    statuses: Counter = Counter()
    problems: list[str] = []
    for caller, key in callers.items():
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        # The admin lists tenants by design; /metrics (open on loopback only, docs/security.md)
        # labels series by tenant. Keys never come back, to anyone.
        keys = {ADMIN_KEY, world.attacker_key, world.victim_key} - {key}
        secrets = keys if caller == "admin" else world.secrets - {key} | keys
        for op in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                          phases=[Phase.generate], suppress_health_check=list(HealthCheck))
                @given(case=op.as_strategy(generation_mode=mode))
                def fuzz(case) -> None:
                    try:
                        r = case.call(base_url=stack.url, headers=headers, timeout=TIMEOUT_S)
                    except Exception as e:  # a hang or a dropped connection: the server's fault here
                        problems.append(f"{caller} {op.label} {mode}: no answer: {type(e).__name__}: {e}")
                        return
                    sent[caller] += 1
                    statuses[r.status_code] += 1
                    content_type = (r.headers.get("content-type") or [""])[0]
                    hidden = keys if op.path == "/metrics" else secrets
                    for problem in check_answer(r.status_code, content_type, r.text, hidden, stack.store.keys.namespace):
                        problems.append(f"{caller} {op.label} {mode}: {problem}: {case.as_curl_command()[:400]}")

                try:
                    fuzz()
                except Unsatisfiable:
                    pass  # nothing to break in an operation without parameters (GET /health)
    assert not problems, "\n".join(problems[:20])
    total = sum(sent.values())
    print(f"fuzzed {total} requests: by caller {dict(sent)}, by status {dict(sorted(statuses.items()))}")
    assert total >= MIN_REQUESTS, (total, dict(sent))
    # alive, idle, nothing leaked in the engine, nothing crashed behind a 4xx
    stack.wait_idle()
    s = stack.engine.stats()
    assert s.kv_blocks_free + s.kv_blocks_used_by_prefixes == s.kv_blocks_total
    assert httpx.get(f"{stack.url}/health").status_code == 200 and stack.engine.is_alive
    crashes = [r.getMessage() for r in caplog.records if r.name.startswith("server") and r.levelno >= logging.ERROR]
    assert not crashes, crashes[:5]
