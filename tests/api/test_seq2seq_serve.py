"""An encoder-decoder served end to end: a real `prefix-serve serve` on a tiny random BART
and T5 (float32, the tests' tiny BPE tokenizer), PEFT SEQ_2_SEQ_LM prefix adapters uploaded
as the zip of their folder, and PEFT's own greedy `generate` as the reference: each adapter
alone, 24 concurrent requests over three prefixes (none, A, B), streaming; the 400s of
routes that need another kind of model, refused uploads of another kind's adapter, and
bad inputs."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

from server.engine.tokenization import encode_text
from tests.api.harness import ADMIN_KEY, sse_events, upload
from tests.api.test_classify import zip_folder
from tests.engine.test_seq2seq import _reference_tokens, peft_seq2seq
from tests.observability.server_process import ServerProcess

PROMPTS = ["the quick brown fox", "hello world, how are you today?", "Translate to French: good morning",
           "a tenant never sees", "the cat sat on the mat while it rained outside", "tokens"]
MAX_TOKENS = 8
MAX_POSITIONS = 64
EOS = 2  # the tiny tokenizer's <|im_end|>


def tiny_seq2seq(arch: str, vocab: int):
    """2 layers each side, d_model 32, 4 heads, the tiny tokenizer's ids (pad 0, eos 2)."""
    torch.manual_seed(3)
    if arch == "bart":
        cfg = BartConfig(vocab_size=vocab, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                         decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                         max_position_embeddings=MAX_POSITIONS, dropout=0.0, attention_dropout=0.0, pad_token_id=0,
                         bos_token_id=1, eos_token_id=EOS, decoder_start_token_id=EOS, forced_bos_token_id=None,
                         forced_eos_token_id=None, init_std=0.08, tie_word_embeddings=False)
        return BartForConditionalGeneration(cfg).eval()
    cfg = T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
                   pad_token_id=0, eos_token_id=EOS, decoder_start_token_id=0, initializer_factor=1.5,
                   n_positions=MAX_POSITIONS)
    return T5ForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module", params=["bart", "t5"])
def s2s_server(request, tmp_path_factory, redis_server, tokenizer):
    from peft import PeftModel

    arch = request.param
    root = tmp_path_factory.mktemp(f"s2s-{arch}")
    model_dir = root / f"tiny-{arch}"
    base = tiny_seq2seq(arch, len(tokenizer))
    base.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    adapters = {}
    for name, nvt, seed in (("a", 4, 21), ("b", 7, 22)):
        folder = root / name
        peft_seq2seq(base, nvt, seed).save_pretrained(folder)
        reference = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
        adapters[f"{arch}-{name}"] = (zip_folder(folder), reference)
    server = ServerProcess(model_dir, redis_server.url, root, arch).start().wait_ready()
    try:
        with server.client() as c:
            for prefix_id, (data, _) in adapters.items():
                r = upload(c, prefix_id, data)
                assert r.status_code in (200, 201), r.text
            # The first step loads the CPU kernels (kernels/cpu_ops.py), which may wait for another
            # process's build of them in the shared cache: that wait is not the test's.
            r = c.post("/v1/generate", json={"prompt": "warm up", "max_tokens": 1}, timeout=900)
            assert r.status_code == 200, r.text
        yield server, base, adapters, model_dir.name
    finally:
        server.stop()


def want_tokens(s2s_server, tokenizer, prefix_id: str | None, prompt: str, n: int = MAX_TOKENS) -> list[int]:
    _, base, adapters, _ = s2s_server
    model = base if prefix_id is None else adapters[prefix_id][1]
    return _reference_tokens(model, encode_text(tokenizer, prompt), n, EOS)


def test_each_adapter_alone_matches_peft(s2s_server, tokenizer):
    server, _, adapters, name = s2s_server
    seen = set()
    with server.client() as c:
        for prefix_id in (None, *adapters):
            for prompt in PROMPTS[:3]:
                r = c.post("/v1/generate", json={"prefix_id": prefix_id, "prompt": prompt, "max_tokens": MAX_TOKENS})
                assert r.status_code == 200, r.text
                body = r.json()
                want = want_tokens(s2s_server, tokenizer, prefix_id, prompt)
                assert body["token_ids"] == want, (prefix_id, prompt)
                assert body["text"] == tokenizer.decode(want, skip_special_tokens=True)
                assert body["finish_reason"] == ("stop" if want[-1] == EOS else "length")
                assert body["usage"]["prompt_tokens"] == len(encode_text(tokenizer, prompt))
                assert [p["id"] for p in body["prefix"]] == ([] if prefix_id is None else [prefix_id])
                seen.add(tuple(want))
                # the OpenAI route: `model` is the prefix id, or the base model's name
                r = c.post("/v1/completions", json={"model": prefix_id or name, "prompt": prompt,
                                                    "max_tokens": MAX_TOKENS, "temperature": 0})
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["text"] == body["text"]
    assert len(seen) > 3  # the prefixes change the output: a server ignoring them would fail


def test_concurrent_requests_over_three_prefixes_each_get_their_own_tokens(s2s_server, tokenizer):
    server, _, adapters, _ = s2s_server
    jobs = [(p, PROMPTS[i % len(PROMPTS)]) for i in range(8) for p in (None, *adapters)]  # 24 requests

    def one(job):
        prefix_id, prompt = job
        with server.client() as c:
            r = c.post("/v1/generate", json={"prefix_id": prefix_id, "prompt": prompt, "max_tokens": MAX_TOKENS,
                                             "ignore_eos": False})
        assert r.status_code == 200, r.text
        return r.json()["token_ids"]

    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(one, jobs))
    for (prefix_id, prompt), tokens in zip(jobs, got):
        assert tokens == want_tokens(s2s_server, tokenizer, prefix_id, prompt), (prefix_id, prompt)


def test_streaming_gives_the_same_tokens(s2s_server, tokenizer):
    server, _, adapters, name = s2s_server
    prefix_id = list(adapters)[1]
    with server.client() as c:
        for prompt in PROMPTS[3:]:
            want = want_tokens(s2s_server, tokenizer, prefix_id, prompt)
            with c.stream("POST", "/v1/generate", json={"prefix_id": prefix_id, "prompt": prompt,
                                                        "max_tokens": MAX_TOKENS, "stream": True}) as r:
                assert r.status_code == 200
                events = sse_events(r)
            deltas = [e for e in events if isinstance(e, dict)]
            assert [t for e in deltas for t in e["token_ids"]] == want
            assert len(deltas) == len(want)  # one event per token
            assert deltas[-1]["finish_reason"] in ("stop", "length")
            assert deltas[-1]["usage"]["completion_tokens"] == len(want)
            with c.stream("POST", "/v1/completions", json={"model": prefix_id, "prompt": prompt, "temperature": 0,
                                                           "max_tokens": MAX_TOKENS, "stream": True}) as r:
                chunks = sse_events(r)
            assert chunks[-1] == "[DONE]"
            assert "".join(ch["choices"][0]["text"] for ch in chunks[:-1]) == tokenizer.decode(
                want, skip_special_tokens=True)


def test_n_samples_and_structured_output_through_the_openai_client(s2s_server, tokenizer):
    import json

    import openai

    server, _, adapters, name = s2s_server
    prefix_id = list(adapters)[0]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=ADMIN_KEY, max_retries=0)
    prompt = PROMPTS[1]
    want = tokenizer.decode(want_tokens(s2s_server, tokenizer, prefix_id, prompt), skip_special_tokens=True)
    greedy = client.completions.create(model=prefix_id, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, n=2)
    assert sorted(c.index for c in greedy.choices) == [0, 1] and [c.text for c in greedy.choices] == [want, want]
    sampled = [client.completions.create(model=prefix_id, prompt=prompt, max_tokens=MAX_TOKENS, temperature=1.0,
                                         seed=5, n=3) for _ in range(2)]
    texts = [sorted((c.index, c.text) for c in s.choices) for s in sampled]
    assert texts[0] == texts[1] and len({t for _, t in texts[0]}) > 1  # seeded: the same 3 samples, not one
    best = client.completions.create(model=prefix_id, prompt=prompt, max_tokens=MAX_TOKENS, temperature=1.0,
                                     seed=5, n=1, best_of=3)
    assert len(best.choices) == 1 and best.choices[0].text in {t for _, t in texts[0]}  # the best of the same 3
    boolean = {"type": "json_schema", "json_schema": {"name": "flag", "schema": {"type": "boolean"}}}
    for model in (prefix_id, name):
        out = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=1.0, seed=1, n=2,
                                        extra_body={"response_format": boolean})
        for choice in out.choices:
            assert choice.finish_reason == "stop" and json.loads(choice.text) in (True, False), choice.text
    with server.client() as c:
        with c.stream("POST", "/v1/generate", json={"prefix_id": prefix_id, "prompt": prompt, "max_tokens": 8,
                                                    "stream": True, "response_format": boolean}) as r:
            assert r.status_code == 200
            events = [e for e in sse_events(r) if isinstance(e, dict)]
        assert json.loads("".join(e["text"] for e in events)) in (True, False)


def test_serve_takes_a_seq2seq_folder_and_other_kinds_routes_say_which_kind_is_loaded(s2s_server):
    """serve used to refuse a seq2seq folder (exit 2); now /v1/models names its kind, and the
    routes of causal and seq_cls models answer 400 wrong_model_kind."""
    server, _, _, name = s2s_server
    with server.client() as c:
        for path, body in (("/v1/chat/completions", {"model": name, "messages": [{"role": "user", "content": "hi"}]}),
                           ("/v1/generate", {"messages": [{"role": "user", "content": "hi"}]}),
                           ("/v1/users/u1/personalize", {"examples": [{"prompt": "a", "completion": "b"}]}),
                           ("/v1/classify", {"input": "hi"})):
            r = c.post(path, json=body)
            assert r.status_code == 400, (path, r.text)
            err = r.json()["error"]
            assert err["type"] == "wrong_model_kind", (path, err)
            assert "a seq2seq_lm model" in err["message"] and "/v1/completions" in err["message"], err
        r = c.put("/v1/prefixes/pp", json={"text": "a system prompt"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "wrong_model_kind", r.text
        models = c.get("/v1/models").json()["data"]
        assert models[0]["id"] == name and {m["kind"] for m in models} == {"seq2seq_lm"}


def test_a_causal_lm_adapter_is_refused_and_nothing_is_stored(s2s_server, vocab):
    from tests.api.harness import make_adapter

    server, *_ = s2s_server
    with server.client() as c:
        r = upload(c, "s2s-wrong-kind", make_adapter(vocab, 4, seed=1).zip_bytes)
        assert r.status_code in (400, 422), r.text
        message = r.json()["error"]["message"]
        assert "task_type is 'CAUSAL_LM'; this seq2seq_lm model needs 'SEQ_2_SEQ_LM'" in message, message
        assert c.get("/v1/prefixes/s2s-wrong-kind").status_code == 404


def test_a_seq2seq_adapter_is_refused_by_a_causal_lm_server(s2s_server, stack):
    _, _, adapters, _ = s2s_server
    data, _ = next(iter(adapters.values()))
    with stack.client() as c:
        r = upload(c, "causal-wrong-kind", data)
        assert r.status_code in (400, 422), r.text
        assert "task_type is 'SEQ_2_SEQ_LM'; expected 'CAUSAL_LM'" in r.json()["error"]["message"]
        assert c.get("/v1/prefixes/causal-wrong-kind").status_code == 404


def test_bad_inputs_get_clear_errors(s2s_server):
    server, _, adapters, name = s2s_server
    prefix_id = list(adapters)[0]  # P = 4
    with server.client() as c:
        r = c.post("/v1/generate", json={"prompt": "", "max_tokens": 4})
        assert r.status_code == 400 and "the prompt is empty" in r.json()["error"]["message"], r.text
        r = c.post("/v1/generate", json={"prompt": list(range(3, 3 + MAX_POSITIONS + 6)), "max_tokens": 4})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"] == (f"prompt of {MAX_POSITIONS + 6} tokens is longer than the "
                                                f"encoder's {MAX_POSITIONS} positions")
        r = c.post("/v1/generate", json={"prefix_id": prefix_id, "prompt": "hi", "max_tokens": MAX_POSITIONS})
        assert r.status_code == 400, r.text
        assert (f"prefix 4 + max_tokens {MAX_POSITIONS} = {MAX_POSITIONS + 4} exceeds the decoder's "
                f"{MAX_POSITIONS} positions; use max_tokens <= {MAX_POSITIONS - 4}") in r.json()["error"]["message"]
        r = c.post("/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 4, "echo": True,
                                            "logprobs": 1})
        assert r.status_code == 400 and "prompt_logprobs: not supported" in r.json()["error"]["message"], r.text
        r = c.post("/v1/generate", json={"prompt": [3, 10_000], "max_tokens": 4})
        assert r.status_code == 400 and "outside the vocabulary" in r.json()["error"]["message"], r.text
        # the server still serves
        r = c.post("/v1/generate", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200 and 1 <= len(r.json()["token_ids"]) <= 2, r.text
