"""Generation through HTTP reproduces HF PEFT: /v1/generate (JSON and SSE), the OpenAI
routes through the official `openai` client, composition, shared prefixes, concurrency."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
import torch

from server.prefix.peft_format import kv_from_prompt_embeddings
from tests.api.harness import ADMIN_KEY, MODEL_NAME, peft_greedy, sse_events, upload
from tests.factories import hf_greedy, tiny_llama

PROMPTS = ["the quick brown fox", "hello world, how are you today?", "prefix tuning serves many tasks",
           "the cat sat on the mat"]


@pytest.fixture(scope="module")
def uploaded(stack, tenant_key, adapters) -> list[dict]:
    """The four adapters uploaded as zips under p0..p3 of tenant acme."""
    out = []
    with stack.client(tenant_key) as c:
        for i, ad in enumerate(adapters):
            r = upload(c, f"p{i}", ad.zip_bytes, description=f"adapter {i}")
            assert r.status_code == 201, r.text
            out.append(r.json())
    return out


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_uploaded_zip_reports_its_metadata(uploaded, adapters):
    assert [u["id"] for u in uploaded] == ["p0", "p1", "p2", "p3"]
    assert [u["num_virtual_tokens"] for u in uploaded] == [4, 6, 8, 5]
    assert uploaded[0]["dtype"] == "float32" and uploaded[0]["bytes"] == adapters[0].prompt_embeddings.numel() * 4
    assert len({u["version"] for u in uploaded}) == 4


def test_generate_gives_peft_greedy_tokens(stack, tenant_key, uploaded, adapters, tokenizer):
    ids = tokenizer(PROMPTS[0])["input_ids"]
    want = peft_greedy(adapters[0], ids, 12)
    with stack.client(tenant_key) as c:
        r = c.post("/v1/generate", json={"prefix_id": "p0", "prompt": PROMPTS[0], "max_tokens": 12})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_ids"] == want
    assert body["text"] == tokenizer.decode(want, skip_special_tokens=True)
    assert body["finish_reason"] == ("stop" if len(want) < 12 else "length")
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(want),
                             "total_tokens": len(ids) + len(want)}
    assert body["prefix"] == [{"id": "p0", "version": uploaded[0]["version"]}]
    # and the prefix matters: the base model alone says something else
    with stack.client(tenant_key) as c:
        base = c.post("/v1/generate", json={"prompt": PROMPTS[0], "max_tokens": 12}).json()
    assert base["token_ids"] != want and base["prefix"] == []


def test_generate_stream_gives_the_same_tokens_as_deltas(stack, tenant_key, uploaded, adapters, tokenizer):
    ids = tokenizer(PROMPTS[1])["input_ids"]
    want = peft_greedy(adapters[1], ids, 10)
    with stack.client(tenant_key) as c:
        with c.stream("POST", "/v1/generate",
                      json={"prefix_id": "p1", "prompt": PROMPTS[1], "max_tokens": 10, "stream": True}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            events = sse_events(r)
    assert events[-1] == "[DONE]"
    deltas = events[:-1]
    assert len(deltas) > 1  # streamed, not one blob
    assert [t for e in deltas for t in e["token_ids"]] == want
    assert "".join(e["text"] for e in deltas) == tokenizer.decode(want, skip_special_tokens=True)
    assert all(e["finish_reason"] is None for e in deltas[:-1])
    last = deltas[-1]
    assert last["finish_reason"] in ("stop", "length")
    assert last["usage"]["completion_tokens"] == len(want)
    assert last["prefix"] == [{"id": "p1", "version": uploaded[1]["version"]}]


def test_messages_use_the_chat_template(stack, tenant_key, uploaded, adapters, tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    want = peft_greedy(adapters[2], chat_ids(tokenizer, messages), 8)
    with stack.client(tenant_key) as c:
        r = c.post("/v1/generate", json={"prefix_id": "p2", "messages": messages, "max_tokens": 8})
    assert r.json()["token_ids"] == want


@pytest.mark.parametrize("stream", [False, True])
def test_openai_client_chat_completions(stack, tenant_key, uploaded, adapters, tokenizer, stream):
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=tenant_key, max_retries=0)
    messages = [{"role": "user", "content": "how are you today?"}]
    want = peft_greedy(adapters[3], chat_ids(tokenizer, messages), 10)
    want_text = tokenizer.decode(want, skip_special_tokens=True)
    if not stream:
        resp = client.chat.completions.create(model="p3", messages=messages, max_tokens=10, temperature=0)
        assert resp.object == "chat.completion" and resp.model == "p3"
        assert resp.choices[0].message.role == "assistant"
        assert resp.choices[0].message.content == want_text
        assert resp.choices[0].finish_reason in ("stop", "length")
        assert resp.usage.completion_tokens == len(want)
        return
    chunks = list(client.chat.completions.create(model="p3", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want_text
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finishes) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want)


def test_openai_client_completions_and_models(stack, tenant_key, uploaded, adapters, tokenizer):
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=tenant_key, max_retries=0)
    want = peft_greedy(adapters[0], tokenizer(PROMPTS[2])["input_ids"], 8)
    resp = client.completions.create(model="p0", prompt=PROMPTS[2], max_tokens=8, temperature=0)
    assert resp.choices[0].text == tokenizer.decode(want, skip_special_tokens=True)
    streamed = list(client.completions.create(model="p0", prompt=PROMPTS[2], max_tokens=8, temperature=0,
                                              stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) == resp.choices[0].text
    base = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[2], max_tokens=8, temperature=0)
    assert base.choices[0].text != resp.choices[0].text
    ids = {m.id for m in client.models.list()}
    assert ids == {MODEL_NAME, "p0", "p1", "p2", "p3"}
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.completions.create(model="no-such-prefix", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="p0", prompt="hi", max_tokens=2, n=65)


def test_prefix_list_and_user_prefix_compose_in_order(stack, tenant_key, uploaded, adapters, tokenizer):
    spec = stack.engine.engine.spec
    kv0 = kv_from_prompt_embeddings(adapters[0].prompt_embeddings, spec)
    kv_user = torch.randn(spec.kv_shape(3), generator=torch.Generator().manual_seed(7))
    from safetensors.torch import save

    with stack.client(tenant_key) as c:
        r = upload(c, "user:bob", save({"prefix_kv": kv_user}), filename="bob.safetensors")
        assert r.status_code == 201, r.text
        ids = tokenizer(PROMPTS[3])["input_ids"]
        by_list = c.post("/v1/generate", json={"prefix_id": ["p0", "user:bob"], "prompt": PROMPTS[3],
                                               "max_tokens": 8}).json()
        by_user = c.post("/v1/generate", json={"prefix_id": "p0", "user_id": "bob", "prompt": PROMPTS[3],
                                               "max_tokens": 8}).json()
    want = hf_greedy(tiny_llama(0, len(tokenizer)), torch.cat([kv0, kv_user], dim=3), ids, 8)
    assert by_list["token_ids"] == want
    assert by_user["token_ids"] == want
    assert [p["id"] for p in by_user["prefix"]] == ["p0", "user:bob"]


def test_admin_prefixes_marked_shared_are_shared_read_only(stack, tenant_key, adapters, tokenizer):
    with stack.client(ADMIN_KEY) as admin:
        assert upload(admin, "house-style", adapters[1].zip_bytes, shared="true").status_code in (200, 201)
        assert admin.get("/v1/prefixes/house-style").json()["shared"] is True
    ids = tokenizer(PROMPTS[0])["input_ids"]
    with stack.client(tenant_key) as c:
        r = c.post("/v1/generate", json={"prefix_id": "shared/house-style", "prompt": PROMPTS[0], "max_tokens": 6})
        assert r.status_code == 200, r.text
        assert r.json()["token_ids"] == peft_greedy(adapters[1], ids, 6)
        # usable, but neither listed nor readable nor deletable through the tenant's namespace
        assert "house-style" not in {p["id"] for p in c.get("/v1/prefixes").json()["data"]}
        assert c.get("/v1/prefixes/house-style").status_code == 404
        assert c.delete("/v1/prefixes/house-style").status_code == 404
        assert c.post("/v1/generate", json={"prefix_id": "house-style", "prompt": "x"}).status_code == 404
    with stack.client(ADMIN_KEY) as admin:
        assert admin.get("/v1/prefixes/house-style").status_code == 200


def test_concurrent_requests_equal_the_same_requests_alone(stack, tenant_key, uploaded, adapters, tokenizer):
    """16 requests over 4 prefixes, greedy and seeded sampling, JSON and SSE, all at once."""
    bodies = []
    for i in range(16):
        body = {"prefix_id": f"p{i % 4}", "prompt": PROMPTS[(i // 4) % 4], "max_tokens": 6 + i % 5,
                "stream": i % 3 == 0}
        if i % 2:
            body.update(temperature=0.9, top_p=0.95, seed=100 + i)
        bodies.append(body)

    async def one(client: httpx.AsyncClient, body: dict) -> list[int]:
        if not body["stream"]:
            r = await client.post("/v1/generate", json=body)
            assert r.status_code == 200, r.text
            return r.json()["token_ids"]
        tokens = []
        async with client.stream("POST", "/v1/generate", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    tokens += httpx.Response(200, content=line[6:]).json()["token_ids"]
        return tokens

    async def run(concurrent: bool) -> list[list[int]]:
        headers = {"Authorization": f"Bearer {tenant_key}"}
        async with httpx.AsyncClient(base_url=stack.url, headers=headers, timeout=60) as client:
            if concurrent:
                return list(await asyncio.gather(*(one(client, b) for b in bodies)))
            return [await one(client, b) for b in bodies]

    alone = asyncio.run(run(concurrent=False))
    together = asyncio.run(run(concurrent=True))
    assert together == alone
    for i, body in enumerate(bodies):  # the greedy ones are also PEFT's tokens
        if "temperature" not in body:
            ids = tokenizer(body["prompt"])["input_ids"]
            assert alone[i] == peft_greedy(adapters[i % 4], ids, body["max_tokens"]), i
    assert len({tuple(t) for t in alone}) > 8  # prefixes and seeds really differ
