"""Overload: a real `serve` process driven at twice its measured capacity (bench/overload.py,
the same code the README's figures come from, here on the tiny model for a few seconds).

Excess requests get 429 with Retry-After and nothing else fails; every accepted request
completes with exactly the tokens it gets alone; memory comes back; the server is ready
right after. The figures are printed (`pytest -s`); nothing asserts on time.
"""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from bench import overload
from tests.reliability.serve_process import Serve, random_prefix

MAX_NUM_SEQS, MAX_QUEUE = 4, 4
# PREFIX_SERVE_LONG_RUN=1: a minute of overload instead of a few seconds (docs: README, Reliability)
DURATION_S = 60.0 if os.environ.get("PREFIX_SERVE_LONG_RUN") else 8.0
PROMPTS = ("the quick brown fox", "hello world, how are you today?", "name: Ada\nsays:", "a tenant never sees")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    serve = Serve(tmp_path_factory.mktemp("overload"), "--workers", "0", "--max-num-seqs", str(MAX_NUM_SEQS),
                  "--max-queue", str(MAX_QUEUE)).start()
    try:
        key = serve.create_tenant("load")
        names = []
        with serve.client(key) as c:
            for i in range(3):
                r = c.put(f"/v1/prefixes/p{i}", files={"file": ("p.safetensors", random_prefix(i, 4 + i))})
                assert r.status_code == 201, r.text
                names.append(f"p{i}")
        yield serve, key, overload.Load((*names, None), PROMPTS, max_tokens=48)
    finally:
        serve.close()


def test_twice_the_capacity_is_refused_with_429_and_loses_nothing(served):
    serve, key, load = served
    result = asyncio.run(overload.run(serve.url, key, load, serve.pid, max_num_seqs=MAX_NUM_SEQS,
                                      max_queue=MAX_QUEUE, factor=2.0, duration_s=DURATION_S))
    print(json.dumps(result, indent=2))
    o, alone = result["overload"], result["alone_check"]
    # overloaded for real: about half the offered requests cannot be admitted
    assert o["refused_429"] > 0 and o["accepted"] > 0, o
    assert o["refused_without_retry_after"] == 0
    assert (o["server_errors_5xx"], o["transport_errors"], o["other_statuses"]) == (0, 0, 0), o["errors_sample"]
    # Not asserted: o["not_sent_client_bound"] (arrivals this client held back because 4 s of
    # them were already outstanding). It counts how fast a starved machine answers, not what
    # the server admits: a CI run with a compiler on the other core had 57 of 1,102 held back
    # while every sent request was answered, 429s with Retry-After and the rest completed.
    assert o["accepted_not_completed"] == 0
    assert alone["answers_checked"] == o["accepted"] and alone["mismatches"] == 0, alone["mismatch_examples"]
    assert o["ready_status_after"] == 200 and o["request_after_status"] == 200
    rss = o["rss_mb"]
    # memory comes back: idle after within 10% (or 48 MB, allocator noise) of idle before
    assert rss["after"] <= rss["before"] + max(48.0, 0.1 * rss["before"]), rss
    assert "Traceback" not in serve.log(), serve.log_tail(60)


def test_an_idle_connection_stays_open_longer_than_client_pools_keep_it(served):
    """A client pool (httpx, the openai client) keeps an idle connection 5 s; a server that
    closed it at 5 s too raced the client's next request on it (a ReadError in this file's
    overload test). serve keeps it open for --keep-alive-s (75 s)."""
    import http.client
    import time
    from urllib.parse import urlsplit

    serve, _, _ = served
    u = urlsplit(serve.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.request("GET", "/health")
        first = conn.getresponse()
        first.read()
        sock = conn.sock
        time.sleep(6.0)  # past uvicorn's default keep-alive of 5 s
        conn.request("GET", "/health")  # http.client would reconnect if the server had closed
        second = conn.getresponse()
        second.read()
        assert (first.status, second.status) == (200, 200)
        assert conn.sock is sock, "the server closed the idle connection"
    finally:
        conn.close()
