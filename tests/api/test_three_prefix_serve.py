"""The three-prefix form (Li & Liang's BART code: a decoder part, an encoder self-attention
part and a cross-attention part) end to end over HTTP: a real `prefix-serve serve` on the
tiny random BART of test_seq2seq_serve.py, a random three-prefix prefix uploaded as the
safetensors file `prefix-serve train` writes (codec bytes: prefix_kv, encoder_kv, cross_kv),
and the engine-level PrefixSeq2Seq on a Prefix with the same parts as the reference (that
path is proven against an explicit reference in tests/engine/test_seq2seq_three_prefix.py).
Alone, composed, in a concurrent mix with a PEFT adapter and no prefix, and the file a real
`prefix-serve train` run writes; dropping the parts changes the tokens (a server that lost
them would fail); the refusals."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import save

from prefix_store import codec
from server.engine.seq2seq import PrefixSeq2Seq, Seq2SeqInput
from server.engine.tokenization import encode_text
from server.prefix import Prefix, compose
from tests.api.harness import upload
from tests.api.test_classify import zip_folder
from tests.api.test_seq2seq_serve import EOS, MAX_TOKENS, PROMPTS, tiny_seq2seq
from tests.engine.test_seq2seq import _reference_tokens, peft_seq2seq
from tests.observability.server_process import ServerProcess

P_DEC, P_ENC, P_CROSS = 3, 6, 5


def _random(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def three_server(tmp_path_factory, redis_server, tokenizer):
    from peft import PeftModel

    root = tmp_path_factory.mktemp("three-bart")
    model_dir = root / "tiny-bart"
    base = tiny_seq2seq("bart", len(tokenizer))
    base.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    engine = PrefixSeq2Seq(copy.deepcopy(base))
    spec = engine.spec
    prefixes = {}  # id -> (the Prefix the engine-level reference runs, the uploaded file)
    for name, seed in (("three", 1), ("three-b", 2)):
        kv, enc, cross = (_random(spec.kv_shape(p), seed * 10 + i) for i, p in enumerate((P_DEC, P_ENC, P_CROSS)))
        prefixes[name] = (Prefix.make(kv, spec, encoder_kv=enc, cross_kv=cross),
                          codec.encode(kv, encoder_kv=enc, cross_kv=cross)[0])
    decoder_only = prefixes["three"][0]
    prefixes["decoder-only"] = (Prefix.make(decoder_only.kv, spec), codec.encode(decoder_only.kv)[0])
    folder = root / "peft-a"
    peft_seq2seq(base, 4, 21).save_pretrained(folder)
    peft_reference = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    server = ServerProcess(model_dir, redis_server.url, root, "bart").start().wait_ready()
    try:
        with server.client() as c:
            infos = {}
            for prefix_id, (_, data) in prefixes.items():
                r = upload(c, prefix_id, data, filename="prefix.safetensors")
                assert r.status_code in (200, 201), r.text
                infos[prefix_id] = r.json()
            r = upload(c, "peft-a", zip_folder(folder))
            assert r.status_code in (200, 201), r.text
            r = c.post("/v1/generate", json={"prompt": "warm up", "max_tokens": 1}, timeout=900)
            assert r.status_code == 200, r.text
        yield server, base, engine, prefixes, peft_reference, infos, model_dir
    finally:
        server.stop()


def want(three_server, tokenizer, prefix_id, prompt: str) -> list[int]:
    """The engine-level tokens for a three-prefix id (or a list: composed), PEFT's for the
    adapter, the base model's for none."""
    _, base, engine, prefixes, peft_reference, *_ = three_server
    ids = encode_text(tokenizer, prompt)
    if prefix_id is None or prefix_id == "peft-a":
        return _reference_tokens(base if prefix_id is None else peft_reference, ids, MAX_TOKENS, EOS)
    names = prefix_id if isinstance(prefix_id, list) else [prefix_id]
    prefix = compose([prefixes[n][0] for n in names])
    [out] = engine.generate([Seq2SeqInput(ids, prefix, MAX_TOKENS)])
    return out.token_ids


def generate(client, prefix_id, prompt: str) -> list[int]:
    r = client.post("/v1/generate", json={"prefix_id": prefix_id, "prompt": prompt, "max_tokens": MAX_TOKENS})
    assert r.status_code == 200, r.text
    return r.json()["token_ids"]


def test_the_metadata_shows_the_part_lengths(three_server):
    server, *_, infos, _ = three_server
    assert (infos["three"]["num_virtual_tokens"], infos["three"]["encoder_tokens"],
            infos["three"]["cross_tokens"]) == (P_DEC, P_ENC, P_CROSS)
    assert infos["three"]["bytes"] == (P_DEC + P_ENC + P_CROSS) * 2 * 2 * 4 * 8 * 4  # L, k/v, heads, hd, fp32
    assert (infos["decoder-only"]["encoder_tokens"], infos["decoder-only"]["cross_tokens"]) == (0, 0)
    with server.client() as c:
        got = c.get("/v1/prefixes/three").json()
    assert (got["encoder_tokens"], got["cross_tokens"]) == (P_ENC, P_CROSS)


def test_a_three_prefix_upload_generates_the_engine_level_tokens_and_its_parts_matter(three_server, tokenizer):
    server, *_ = three_server
    with server.client() as c:
        for prompt in PROMPTS[:4]:
            got = generate(c, "three", prompt)
            assert got == want(three_server, tokenizer, "three", prompt), prompt
            decoder_only = generate(c, "decoder-only", prompt)
            assert decoder_only == want(three_server, tokenizer, "decoder-only", prompt), prompt
            # mutation sanity: a server that dropped the encoder and cross parts would give these
            assert got != decoder_only, prompt


def test_the_file_prefix_serve_train_writes_uploads_and_serves(three_server, tokenizer, tmp_path):
    import json

    from server.cli import main

    server, _, engine, *_, model_dir = three_server
    data = tmp_path / "copy.jsonl"
    data.write_text("".join(json.dumps({"prompt": w, "completion": w}) + "\n" for w in ("abc", "hello", "the cat")))
    out = tmp_path / "out"
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--steps", "3",
                 "--num-virtual-tokens", "2", "--encoder-tokens", "3", "--cross-tokens", "4", "--batch-size", "3",
                 "--mid-dim", "16", "--device", "cpu"]) == 0
    blob = (out / "prefix.safetensors").read_bytes()
    stored = codec.load_all(blob)
    prefix = Prefix.make(stored.kv, engine.spec, encoder_kv=stored.encoder_kv, cross_kv=stored.cross_kv)
    with server.client() as c:
        r = upload(c, "trained", blob, filename="prefix.safetensors")
        assert r.status_code in (200, 201), r.text
        assert (r.json()["num_virtual_tokens"], r.json()["encoder_tokens"], r.json()["cross_tokens"]) == (2, 3, 4)
        for prompt in PROMPTS[:2]:
            ids = encode_text(tokenizer, prompt)
            [out_row] = engine.generate([Seq2SeqInput(ids, prefix, MAX_TOKENS)])
            assert generate(c, "trained", prompt) == out_row.token_ids, prompt


def test_composed_three_prefix_prefixes_join_each_part(three_server, tokenizer):
    server, *_ = three_server
    with server.client() as c:
        for prompt in PROMPTS[:3]:
            got = generate(c, ["three", "three-b"], prompt)
            assert got == want(three_server, tokenizer, ["three", "three-b"], prompt), prompt
            assert got != generate(c, "three", prompt), prompt


def test_concurrent_mix_with_a_peft_adapter_and_no_prefix(three_server, tokenizer):
    server, *_ = three_server
    jobs = [(p, PROMPTS[i % len(PROMPTS)]) for i in range(6) for p in ("three", "peft-a", None, "three-b")]

    def one(job):
        with server.client() as c:
            return generate(c, *job)

    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(one, jobs))
    for (prefix_id, prompt), tokens in zip(jobs, got):
        assert tokens == want(three_server, tokenizer, prefix_id, prompt), (prefix_id, prompt)


def test_bad_parts_are_refused_with_the_numbers(three_server):
    server, _, engine, *_ = three_server
    spec = engine.spec
    kv = _random(spec.kv_shape(P_DEC), 5)
    bad_heads = _random((spec.num_layers, 2, spec.num_kv_heads + 1, 4, spec.head_dim), 6)
    with server.client() as c:
        data = save({"prefix_kv": kv, "cross_kv": bad_heads})  # codec.encode itself would refuse it
        r = upload(c, "bad-part", data, filename="prefix.safetensors")
        assert r.status_code == 422, r.text
        assert (f"prefix cross_kv has {spec.num_kv_heads + 1} kv heads, model has {spec.num_kv_heads}"
                in r.json()["error"]["message"]), r.text
        data = save({"prefix_kv": kv, "encoder_kv": _random(spec.kv_shape(2), 7).half()})
        r = upload(c, "bad-part", data, filename="prefix.safetensors")
        assert r.status_code == 422, r.text
        assert "encoder_kv is float16 but prefix_kv is float32" in r.json()["error"]["message"], r.text
        assert c.get("/v1/prefixes/bad-part").status_code == 404


def test_a_causal_lm_server_refuses_the_parts_and_stores_nothing(stack):
    spec = stack.engine.spec
    kv = _random(spec.kv_shape(3), 8)
    data = codec.encode(kv, encoder_kv=_random(spec.kv_shape(2), 9))[0]
    with stack.client() as c:
        r = upload(c, "causal-three", data, filename="prefix.safetensors")
        assert r.status_code == 422, r.text
        message = r.json()["error"]["message"]
        assert (f"the file holds encoder_kv {list(spec.kv_shape(2))}, a part of the three-prefix form" in message
                and "this server runs a causal_lm model" in message), message
        assert c.get("/v1/prefixes/causal-three").status_code == 404
        r = upload(c, "causal-plain", codec.encode(kv)[0], filename="prefix.safetensors")  # the kv alone is fine
        assert r.status_code in (200, 201), r.text
        assert (r.json()["encoder_tokens"], r.json()["cross_tokens"]) == (0, 0)
