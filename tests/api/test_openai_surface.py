"""What real OpenAI clients and evaluation harnesses send, through the official `openai`
client against a real server: logprobs (equal to PEFT's log_softmax), echo and prompt
scoring, lists of prompts, n and best_of, chat logprobs, and the tokenizer routes."""

from __future__ import annotations

import math

import openai
import pytest
import torch

from tests.api.harness import MODEL_NAME, sse_events, upload

PROMPTS = ["the quick brown fox", "hello world, how are you today?"]


@pytest.fixture(scope="module")
def uploaded(stack, tenant_key, adapters) -> list[dict]:
    with stack.client(tenant_key) as c:
        out = [upload(c, f"q{i}", ad.zip_bytes) for i, ad in enumerate(adapters[:2])]
    assert all(r.status_code == 201 for r in out)
    return [r.json() for r in out]


@pytest.fixture(scope="module")
def client(stack, tenant_key, uploaded) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=tenant_key, max_retries=0)


def peft_logprobs(adapter, ids: list[int]) -> torch.Tensor:
    """[len(ids), V]: row t is PEFT's log_softmax after ids[:t + 1]."""
    with torch.no_grad():
        return torch.log_softmax(adapter.peft_model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_echo_with_logprobs_equals_peft(client, adapters, tokenizer):
    ids = tokenizer(PROMPTS[0])["input_ids"]
    resp = client.completions.create(model="q0", prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=3,
                                     echo=True, extra_body={"ignore_eos": True})
    (choice,) = resp.choices
    assert choice.text.startswith(PROMPTS[0])
    lp = choice.logprobs
    out_ids = tokenizer(choice.text[len(PROMPTS[0]):], add_special_tokens=False)["input_ids"]
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids) + 6
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens) == choice.text and lp.text_offset[0] == 0
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    want = peft_logprobs(adapters[0], ids + out_ids[:6])
    all_ids = ids + out_ids[:6]
    for t in range(1, len(all_ids)):
        assert abs(lp.token_logprobs[t] - want[t - 1, all_ids[t]].item()) < 1e-4
        assert abs(max(lp.top_logprobs[t].values()) - want[t - 1].max().item()) < 1e-4
        assert len(lp.top_logprobs[t]) in (3, 4)  # the 3 best, and the token there when it is not among them
    # greedy: every output token is the most likely one
    assert all(lp.token_logprobs[t] == max(lp.top_logprobs[t].values()) for t in range(len(ids), len(all_ids)))


def test_scoring_a_batch_of_token_prompts_as_evaluation_harnesses_do(client, adapters, tokenizer):
    """lm-evaluation-harness's local-completions: token ids, echo, logprobs, max_tokens 0 or 1."""
    batch = [tokenizer(p)["input_ids"] for p in PROMPTS]
    resp = client.completions.create(model="q1", prompt=batch, max_tokens=0, echo=True, logprobs=1, temperature=0)
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.usage.completion_tokens == 0 and resp.usage.prompt_tokens == sum(map(len, batch))
    for ids, choice in zip(batch, resp.choices):
        assert choice.text == tokenizer.decode(ids)
        want = peft_logprobs(adapters[1], ids)
        got = choice.logprobs.token_logprobs
        assert got[0] is None and len(got) == len(ids)
        assert max(abs(got[t] - want[t - 1, ids[t]].item()) for t in range(1, len(ids))) < 1e-4
    one = client.completions.create(model="q1", prompt=batch, max_tokens=1, echo=True, logprobs=1, temperature=0)
    assert [len(c.logprobs.tokens) for c in one.choices] == [len(ids) + 1 for ids in batch]
    assert one.choices[0].logprobs.token_logprobs[:len(batch[0])] == resp.choices[0].logprobs.token_logprobs


def test_prompts_times_n_choices_in_order(client, tokenizer):
    greedy = client.completions.create(model="q0", prompt=PROMPTS, n=2, max_tokens=5, temperature=0,
                                       extra_body={"ignore_eos": True})
    texts = [c.text for c in greedy.choices]
    assert [c.index for c in greedy.choices] == [0, 1, 2, 3]
    singles = [client.completions.create(model="q0", prompt=p, max_tokens=5, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text for p in PROMPTS]
    assert texts == [singles[0], singles[0], singles[1], singles[1]]
    assert greedy.usage.completion_tokens == 4 * 5  # every choice's tokens; each prompt's counted once
    assert greedy.usage.prompt_tokens == sum(len(tokenizer(p)["input_ids"]) for p in PROMPTS)
    seeded = dict(model="q0", prompt=PROMPTS[1], n=4, max_tokens=8, temperature=1.0, seed=3)
    first, again = (client.completions.create(**seeded) for _ in range(2))
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices}) > 1  # the samples drew apart


def test_best_of_returns_the_samples_with_the_best_logprob_per_token(client):
    args = dict(model="q0", prompt=PROMPTS[0], max_tokens=6, temperature=1.0, seed=11, logprobs=0)
    all_four = client.completions.create(n=4, **args)

    def per_token(c):
        return sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs)

    ranked = sorted(all_four.choices, key=per_token, reverse=True)
    best = client.completions.create(n=2, best_of=4, **args)
    assert [c.text for c in best.choices] == [c.text for c in ranked[:2]]
    assert [c.index for c in best.choices] == [0, 1]
    quiet = client.completions.create(n=1, best_of=4, **{**args, "logprobs": None})
    assert quiet.choices[0].text == ranked[0].text and quiet.choices[0].logprobs is None


def test_streamed_prompts_and_samples_equal_the_json_response(client):
    args = dict(model="q1", prompt=PROMPTS, n=2, max_tokens=6, temperature=0.7, seed=9, logprobs=2)
    whole = client.completions.create(**args)
    texts, tokens = {}, {}
    for chunk in client.completions.create(stream=True, **args):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            tokens[c.index] = tokens.get(c.index, []) + (c.logprobs.tokens if c.logprobs else [])
    assert [texts[i] for i in range(4)] == [c.text for c in whole.choices]
    assert [tokens[i] for i in range(4)] == [c.logprobs.tokens for c in whole.choices]


def test_chat_logprobs_top_logprobs_and_n(client, adapters, tokenizer):
    messages = [{"role": "user", "content": "hello world"}]
    resp = client.chat.completions.create(model="q0", messages=messages, max_tokens=5, temperature=0, n=2,
                                          logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.choices[0].message.content == resp.choices[1].message.content
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    content = resp.choices[0].logprobs.content
    assert len(content) == 5 and all(len(e.top_logprobs) == 2 for e in content)
    assert "".join(e.token for e in content) == resp.choices[0].message.content
    want = peft_logprobs(adapters[0], ids)  # the first token's distribution, after the prompt
    assert abs(content[0].logprob - want[-1].max().item()) < 1e-4
    assert abs(content[0].top_logprobs[1].logprob - torch.topk(want[-1], 2).values[1].item()) < 1e-4
    assert all(e.top_logprobs[0].logprob == e.logprob for e in content)  # greedy: the top token each time
    assert bytes(content[0].bytes).decode() == content[0].token
    streamed = client.chat.completions.create(model="q0", messages=messages, max_tokens=5, temperature=0, n=2,
                                              logprobs=True, stream=True, extra_body={"ignore_eos": True})
    got = {0: [], 1: []}
    for chunk in streamed:
        for c in chunk.choices:
            got[c.index] += [e.logprob for e in (c.logprobs.content if c.logprobs else [])]
    assert got[0] == got[1] == [e.logprob for e in content]


def test_bad_combinations_are_400_with_the_numbers(client):
    cases = [
        (dict(n=65), "less than or equal to 64"),
        (dict(n=3, best_of=2), "best_of \\(2\\) must be at least n \\(3\\)"),
        (dict(max_tokens=0), "max_tokens 0 generates nothing"),
        (dict(best_of=3, stream=True), "best_of > n cannot be streamed"),
        (dict(logprobs=21), "less than or equal to 20"),
        (dict(prompt=["a"] * 20, n=4), "20 prompts x 4 samples = 80 sequences; at most 64"),
    ]
    for extra, message in cases:
        args = {**dict(model="q0", prompt="hi", max_tokens=2), **extra}
        with pytest.raises(openai.BadRequestError, match=message):
            client.completions.create(**args)


def test_tokenize_detokenize_tokenizer_info_and_models(stack, tenant_key, uploaded, tokenizer, client):
    with stack.client(tenant_key) as c:
        tok = c.post("/tokenize", json={"prompt": PROMPTS[1]}).json()
        assert tok["tokens"] == tokenizer(PROMPTS[1])["input_ids"] and tok["count"] == len(tok["tokens"])
        assert tok["max_model_len"] == stack.engine.engine.spec.max_model_len
        chat = c.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             add_generation_prompt=True)
        assert chat["tokens"] == tokenizer(text, add_special_tokens=False)["input_ids"]
        assert c.post("/detokenize", json={"tokens": tok["tokens"]}).json() == {"prompt": PROMPTS[1]}
        bad = c.post("/detokenize", json={"tokens": [10 ** 6]})
        assert bad.status_code == 400 and "outside the vocabulary" in bad.json()["error"]["message"]
        info = c.get("/tokenizer_info").json()
        assert info["eos_token"] == tokenizer.eos_token and info["model_max_length"] == tok["max_model_len"]
        assert c.post("/tokenize", json={"prompt": "x"}, headers={"Authorization": "Bearer nope"}).status_code == 401
        alias = c.post("/generate", json={"prefix_id": "q0", "prompt": PROMPTS[0], "max_tokens": 4}).json()
        assert alias["token_ids"] == c.post("/v1/generate", json={"prefix_id": "q0", "prompt": PROMPTS[0],
                                                                   "max_tokens": 4}).json()["token_ids"]
    cards = {m.id: m for m in client.models.list()}
    assert cards["q0"].prefix_length == 4 and cards["q0"].version == uploaded[0]["version"]
    assert cards["q1"].prefix_length == 6 and cards[MODEL_NAME].max_model_len == tok["max_model_len"]
    assert math.isfinite(cards["q0"].created)


# --- structured output (response_format). The test tokenizer spells no braces or quotes, so
# the JSON here is a boolean; tests/engine/test_guided_decoding.py holds SmolLM2 to object schemas.

BOOLEAN_FORMAT = {"type": "json_schema", "json_schema": {"name": "flag", "schema": {"type": "boolean"}}}


def test_response_format_holds_every_route_to_the_schema(client, stack, tenant_key):
    import json

    for seed in range(3):
        chat = client.chat.completions.create(model="q0", messages=[{"role": "user", "content": "hello"}],
                                              max_tokens=8, temperature=1.0, seed=seed, n=2,
                                              response_format=BOOLEAN_FORMAT)
        for choice in chat.choices:
            assert choice.finish_reason == "stop" and json.loads(choice.message.content) in (True, False)
    text = client.completions.create(model="q1", prompt=PROMPTS[1], max_tokens=8, temperature=0,
                                     extra_body={"response_format": BOOLEAN_FORMAT})
    assert json.loads(text.choices[0].text) in (True, False)
    streamed = client.chat.completions.create(model="q0", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                              temperature=0, stream=True, response_format=BOOLEAN_FORMAT)
    assert json.loads("".join(c.choices[0].delta.content or "" for c in streamed if c.choices)) in (True, False)
    with stack.client(tenant_key) as c:
        r = c.post("/v1/generate", json={"prefix_id": "q0", "prompt": PROMPTS[0], "max_tokens": 8,
                                         "response_format": BOOLEAN_FORMAT})
        assert r.status_code == 200 and json.loads(r.json()["text"]) in (True, False)
        free = c.post("/v1/generate", json={"prefix_id": "q0", "prompt": PROMPTS[0], "max_tokens": 8,
                                            "response_format": {"type": "text"}, "ignore_eos": True})
        assert free.status_code == 200 and len(free.json()["token_ids"]) == 8


def test_a_response_format_that_cannot_be_followed_is_a_400_naming_why(client):
    with pytest.raises(openai.BadRequestError, match="cannot be used for constrained decoding"):
        client.chat.completions.create(model="q0", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "x", "schema": {"type": "object", "properties": {
                                               "a": {"$ref": "#/nowhere"}}}}})
    # any JSON object needs braces, which this tokenizer cannot spell: the engine says so
    with pytest.raises(openai.BadRequestError, match="cannot be followed with this model's tokens"):
        client.chat.completions.create(model="q0", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       response_format={"type": "json_object"})
    with pytest.raises(openai.BadRequestError, match="json_schema"):
        client.chat.completions.create(model="q0", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       response_format={"type": "json_schema"})
