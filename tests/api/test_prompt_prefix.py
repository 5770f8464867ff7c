"""PUT /v1/prefixes/{id} with a text: the server computes the prefix with its model, stores
it in Redis like any prefix (kind "prompt"), and serving it equals sending the text."""

from __future__ import annotations

import json

import pytest

from server.cli import main as cli_main

SYSTEM = "You are a terse assistant. Answer in one word. Never apologise. " * 3


def _generate(c, **body) -> dict:
    r = c.post("/v1/generate", json={"max_tokens": 10, "ignore_eos": True, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_prompt_prefix_equals_sending_the_text(stack, tenant_key, tokenizer):
    text_ids = tokenizer(SYSTEM)["input_ids"]
    with stack.client(tenant_key) as c:
        r = c.put("/v1/prefixes/terse", json={"text": SYSTEM, "description": "system prompt"})
        assert r.status_code == 201, r.text
        info = r.json()
        assert info["kind"] == "prompt" and info["num_virtual_tokens"] == len(text_ids)
        assert c.get("/v1/prefixes/terse").json()["kind"] == "prompt"
        for question in ("What is two plus two?", "Name a colour."):
            cont = tokenizer(question, add_special_tokens=False)["input_ids"]
            served = _generate(c, prefix_id="terse", prompt=cont)
            whole = _generate(c, prompt=text_ids + cont)
            assert served["token_ids"] == whole["token_ids"]
            assert served["usage"]["prompt_tokens"] == len(cont)  # the text is not prefilled again
            # float32 logprobs of the continuation, through the prefix and in full
            scored = [c.post("/v1/completions", json={"model": model, "prompt": ids, "max_tokens": 0, "echo": True,
                                                       "logprobs": 0}).json()["choices"][0]["logprobs"]["token_logprobs"]
                      for model, ids in (("terse", cont), ("tiny-llama", text_ids + cont))]
            assert max(abs(a - b) for a, b in zip(scored[0][1:], scored[1][len(text_ids) + 1:])) < 1e-4


def test_messages_make_the_chat_templates_prefix(stack, tenant_key, tokenizer):
    messages = [{"role": "system", "content": "Only answer in French."},
                {"role": "user", "content": "hello"}, {"role": "assistant", "content": "bonjour"}]
    want = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    with stack.client(tenant_key) as c:
        r = c.put("/v1/prefixes/french", json={"messages": messages})
    assert r.status_code == 201, r.text
    assert r.json()["num_virtual_tokens"] == len(tokenizer(want, add_special_tokens=False)["input_ids"])


def test_prompt_prefix_limits_name_the_numbers(stack, tenant_key):
    limit = stack.engine.engine.spec.max_model_len
    per_token = stack.engine.engine.spec.kv_bytes_per_token(stack.engine.dtype)
    before = stack.store.list("acme")
    with stack.client(tenant_key) as c:
        cases = [
            ({"text": "a " * (limit + 10)}, 400, f"a prompt prefix must leave room in the context of {limit} tokens"),
            ({"text": "x", "messages": [{"role": "user", "content": "y"}]}, 400, "exactly one of 'text' and 'messages'"),
            ({"text": ""}, 400, "the text has no tokens"),
            ({"text": "hi", "shared": True}, 403, "only the admin key can share"),
            ({"text": "hi", "temperature": 1}, 400, "temperature"),
        ]
        for body, status, message in cases:
            r = c.put("/v1/prefixes/bad", json=body)
            assert r.status_code == status and message in r.json()["error"]["message"], (body, r.text)
        over = stack.settings.max_prefix_bytes // per_token + 1
        if over < limit:
            r = c.put("/v1/prefixes/bad", json={"text": "a " * over})
            assert r.status_code == 413 and "max_prefix_bytes" in r.json()["error"]["message"]
    assert stack.store.list("acme") == before  # nothing half-written


def test_the_cli_command_creates_one(stack, tenant_key, tmp_path, capsys):
    path = tmp_path / "system.txt"
    path.write_text(SYSTEM, encoding="utf-8")
    assert cli_main(["prompt-prefix", "from-file", "--file", str(path), "--url", stack.url, "--key", tenant_key]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "created" and out["kind"] == "prompt"
    messages = tmp_path / "m.json"
    messages.write_text(json.dumps([{"role": "system", "content": "be brief"}]))
    assert cli_main(["prompt-prefix", "from-messages", "--messages", str(messages), "--url", stack.url,
                     "--key", tenant_key]) == 0
    assert cli_main(["prompt-prefix", "x", "--text", "a " * 1000, "--url", stack.url, "--key", tenant_key]) != 0
    with pytest.raises(SystemExit):
        cli_main(["prompt-prefix", "x", "--url", stack.url])  # no source
