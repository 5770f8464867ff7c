"""A live server (the api tests' harness: real uvicorn, tiny Llama, real redis-server) and
a fixed burst of traffic whose exact counts the metric tests compare against."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import pytest

from tests.api.harness import Stack, make_adapter, upload
from tests.observability.promql import scrape, value

TENANT = "acme"
PROMPT = [5, 17, 42, 99, 7]  # token ids: no tokenizer in the way


@dataclass
class Traffic:
    """What the burst did, as the server answered it."""

    key: str
    generate_ok: int = 0  # POST /v1/generate answered 200
    completions_ok: int = 0  # POST /v1/completions answered 200
    not_found: int = 0  # POST /v1/generate answered 404 (unknown prefix)
    finished: int = 0  # generations that ran to the end
    multi_token: int = 0  # ... with more than one output token (they have a TPOT)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefix_bytes: int = 0  # of the one uploaded prefix
    ids_used: list[str] = field(default_factory=list)  # prefix and user ids sent


def send_traffic(stack: Stack, vocab: int) -> Traffic:
    key = stack.create_tenant(TENANT)
    t = Traffic(key)
    adapter = make_adapter(vocab, num_virtual_tokens=6, seed=3)
    with stack.client(key) as c:
        r = upload(c, "support-bot", adapter.zip_bytes)
        assert r.status_code == 201, r.text
        t.prefix_bytes = r.json()["bytes"]
        t.ids_used.append("support-bot")

        def done(usage: dict) -> None:
            t.finished += 1
            t.multi_token += usage["completion_tokens"] > 1
            t.prompt_tokens += usage["prompt_tokens"]
            t.completion_tokens += usage["completion_tokens"]

        for prefix, n in (("support-bot", 6), ("support-bot", 3), (None, 4), ("support-bot", 1)):
            r = c.post("/v1/generate", json={"prefix_id": prefix, "prompt": PROMPT, "max_tokens": n,
                                             "ignore_eos": True})
            assert r.status_code == 200, r.text
            t.generate_ok += 1
            done(r.json()["usage"])
        with c.stream("POST", "/v1/generate", json={"prefix_id": "support-bot", "prompt": PROMPT,
                                                     "max_tokens": 5, "ignore_eos": True, "stream": True}) as r:
            assert r.status_code == 200
            last = [line for line in r.iter_lines() if line.startswith("data: {")][-1]
        t.generate_ok += 1
        done(json.loads(last[len("data: "):])["usage"])
        r = c.post("/v1/completions", json={"model": "support-bot", "prompt": PROMPT, "max_tokens": 4,
                                            "ignore_eos": True})
        assert r.status_code == 200, r.text
        t.completions_ok += 1
        done(r.json()["usage"])
        for missing in ("no-such-prefix-0001", "no-such-prefix-0002"):
            r = c.post("/v1/generate", json={"prefix_id": missing, "prompt": PROMPT, "max_tokens": 2})
            assert r.status_code == 404, r.text
            t.not_found += 1
            t.ids_used.append(missing)
        r = c.get("/v1/prefixes/support-bot")
        assert r.status_code == 200, r.text
    stack.wait_idle()
    return t


def wait_for_count(url: str, name: str, want: float, timeout: float = 10.0, **labels: str) -> dict:
    """Scrape until `name{labels}` reaches `want`: the middleware records a request just after
    its last byte went out, so the client can be a moment ahead of the counter."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if value(samples, name, **labels) >= want or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)
