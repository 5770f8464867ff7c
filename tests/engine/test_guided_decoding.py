"""Structured output: a request held to a JSON schema gives JSON that follows it (the real
SmolLM2, in a batch with free requests, which give exactly their tokens alone); patterns
compile off the engine process's step loop; a bad schema is refused naming why."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch

from server.engine.engine_core import Abort, AddRequest, EngineCore, PrefixPayload
from server.engine.guided_decoding import MAX_SCHEMA_CHARS, GuideError, json_schema_regex, mask_logits, token_bytes
from server.engine.llm_engine import LLMEngine
from server.engine.outputs import FinishReason
from server.engine.sampling_params import SamplingParams
from server.engine.seq2seq import PrefixSeq2Seq
from server.engine.seq2seq_core import Seq2SeqCore
from server.prefix import PrefixRef
from tests.api.harness import tiny_tokenizer
from tests.factories import make_engine, random_prefix, tiny_llama

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"},
                         "city": {"type": "string", "maxLength": 24}},
          "required": ["name", "age", "city"]}
FLAG = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
BOOLEAN = {"type": "boolean"}  # JSON the tiny test tokenizer can spell (it has no braces or quotes)


def _follows_person(text: str) -> dict:
    value = json.loads(text)
    assert list(value) == ["name", "age", "city"]  # the schema's order
    assert isinstance(value["name"], str) and isinstance(value["age"], int) and isinstance(value["city"], str)
    return value


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_each_token_stands_for_the_bytes_it_decodes_to(which, smollm2_tokenizer):
    tok = tiny_tokenizer() if which == "tiny" else smollm2_tokenizer
    found = token_bytes(tok)
    assert set(found).isdisjoint(tok.all_special_ids)
    assert len(found) == len(tok) - len(tok.all_special_ids)
    checked = 0
    for tid, b in found.items():
        if b.isascii():  # whole characters: the tokenizer's own decode must agree
            assert tok.decode([tid]) == b.decode(), tid
            checked += 1
    assert checked > 0.5 * len(found)


def test_a_schema_that_cannot_guide_is_refused_naming_why():
    with pytest.raises(GuideError, match="cannot be used"):
        json_schema_regex({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}})
    big = {"type": "object", "properties": {f"k{i}": {"type": "string"} for i in range(2000)}}
    with pytest.raises(GuideError, match=rf"is \d+ characters; at most {MAX_SCHEMA_CHARS}"):
        json_schema_regex(big)
    assert re.fullmatch(json_schema_regex(FLAG), '{"ok": true}')
    assert not re.fullmatch(json_schema_regex(FLAG), '{"ok": 1}')


def test_masked_rows_keep_only_the_allowed_tokens_and_the_others_are_untouched():
    tok = tiny_tokenizer()
    engine = make_engine(tiny_llama(vocab=len(tok)), tokenizer=tok)
    guide = engine.guides.guide(json_schema_regex(BOOLEAN))
    logits = torch.randn(3, len(tok))
    out = mask_logits(logits, [1], [guide])
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    allowed = torch.isfinite(out[1]).nonzero().flatten().tolist()
    assert allowed == sorted(guide.get_tokens()) and 0 < len(allowed) < 20
    assert all("true".startswith(tok.decode([t])) or "false".startswith(tok.decode([t])) for t in allowed)
    assert torch.equal(out[1, allowed], logits[1, allowed])


def test_json_schema_output_follows_the_schema_beside_free_requests(smollm2_fp32):
    model, tok, _ = smollm2_fp32
    engine = LLMEngine(model, tok)
    ask = tok.apply_chat_template([{"role": "user", "content": "Give me a JSON record for Alice, 31, from Paris."}],
                                  add_generation_prompt=True, tokenize=True, return_dict=False)
    other = tok("The capital of France is")["input_ids"]
    prefix = engine.make_prefix(torch.randn(engine.spec.num_layers, 2, engine.spec.num_kv_heads, 5,
                                            engine.spec.head_dim, generator=torch.Generator().manual_seed(0)) * 0.3)
    free = SamplingParams(max_tokens=12, ignore_eos=True)
    guided = SamplingParams(max_tokens=60, guided_regex=json_schema_regex(PERSON))
    sampled = SamplingParams(max_tokens=60, guided_regex=json_schema_regex(PERSON), temperature=1.0, seed=5, n=2)
    outs = engine.generate([ask, other, ask, ask], [guided, free, free, sampled], [None, prefix, None, prefix])
    assert outs[0].finish_reason == FinishReason.STOP, outs[0].output_text
    assert _follows_person(outs[0].output_text) == {"name": "Alice", "age": 31, "city": "Paris"}
    for out in outs[3:]:  # both samples: sampled, on a prefix, and still following the schema
        assert out.finish_reason == FinishReason.STOP, out.output_text
        _follows_person(out.output_text)
    # the free requests of that batch give exactly what they give alone
    alone = engine.generate([other, ask], [free, free], [prefix, None])
    assert [o.output_token_ids for o in outs[1:3]] == [o.output_token_ids for o in alone]
    assert not outs[2].output_text.lstrip().startswith('{"name"')  # the free request was not guided
    assert engine.kv.pool.num_free == engine.kv.pool.num_blocks - engine.kv.prefixes.num_blocks


def _run_core(core: EngineCore, until: float = 60.0) -> list:
    got, deadline = [], time.monotonic() + until
    while time.monotonic() < deadline:
        batch = core.step()
        got.append(batch)
        if any(o.finished for o in batch.outputs) or batch.rejected:
            return got
        time.sleep(0.001)
    raise AssertionError("nothing finished")


def test_the_engine_process_compiles_a_pattern_off_its_step_loop():
    tok = tiny_tokenizer()
    engine = make_engine(tiny_llama(vocab=len(tok)), tokenizer=tok)
    core = EngineCore(engine)
    regex = json_schema_regex(BOOLEAN)
    core.apply([AddRequest("free", [5, 6, 7], SamplingParams(max_tokens=30, ignore_eos=True), None, 0.0, seq=1),
                AddRequest("json", [5, 6, 7], SamplingParams(max_tokens=30, guided_regex=regex), None, 0.0, seq=2)])
    assert set(core._compiling) == {"json"} and "free" in engine.requests  # the free one does not wait
    batches = _run_core(core)
    while engine.has_unfinished() or core._compiling:
        batches.append(core.step())
    text = "".join(o.new_text for b in batches for o in b.outputs if o.request_id == "json")
    assert json.loads(text) in (True, False)
    assert engine.guides.has(regex)
    # a pattern no token sequence can follow is rejected with the reason; an abort while compiling leaves nothing
    core.apply([AddRequest("never", [5], SamplingParams(max_tokens=4, guided_regex="\x00\x01"), None, 0.0, seq=3)])
    rejected = _run_core(core)[-1].rejected
    assert [r for r, _ in rejected] == ["never"] and isinstance(rejected[0][1], GuideError)
    core.apply([AddRequest("gone", [5], SamplingParams(max_tokens=4, guided_regex="[a-z]{1,3}"), None, 0.0, seq=4),
                Abort("gone")])
    for _ in range(50):
        batch = core.step()
        assert not batch.outputs and not batch.rejected
        time.sleep(0.005)
    assert not core._compiling and "gone" not in engine.requests
    assert engine.kv.pool.num_free == engine.kv.pool.num_blocks


def test_an_encoder_decoder_holds_its_output_to_the_pattern_beside_free_requests():
    """Seq2SeqCore (BART): guided rows, one on a prefix, in the decoder steps of a free row;
    the free row gets its tokens alone, the guided rows text that matches, ended by EOS."""
    from tests.engine.test_seq2seq import tiny_bart

    tok = tiny_tokenizer()
    model = PrefixSeq2Seq(tiny_bart(vocab=len(tok)))
    regex = "(cat|dog|bird)( (cat|dog|bird)){2}"
    free = AddRequest("free", [5, 6, 7, 8], SamplingParams(max_tokens=12, ignore_eos=True), None, 0.0, seq=1)
    kv = torch.randn(3, 2, 4, 5, 8) * 0.5  # the decoder self-attention part [L, 2, H, P, hd]
    ref = PrefixRef("acme", "p", "v1")
    guided = [AddRequest("g", [9, 10, 11], SamplingParams(max_tokens=30, guided_regex=regex), None, 0.0, seq=2),
              AddRequest("gp", [12, 13], SamplingParams(max_tokens=30, guided_regex=regex, temperature=1.0, seed=3),
                         PrefixPayload((ref,), (ref,), kv), 0.0, seq=3)]

    def run(core: Seq2SeqCore, cmds) -> dict[str, list]:
        core.apply(cmds)
        got: dict[str, list] = {}
        deadline = time.monotonic() + 60
        while (core.has_unfinished() or core._compiling) and time.monotonic() < deadline:
            batch = core.step()
            assert not batch.rejected, batch.rejected
            for out in batch.outputs:
                got.setdefault(out.request_id, []).append(out)
            time.sleep(0.001)
        assert not core.has_unfinished()
        return got

    alone = run(Seq2SeqCore(model, tokenizer=tok), [free])
    core = Seq2SeqCore(model, tokenizer=tok)
    mixed = run(core, [free, *guided])
    assert [t for o in mixed["free"] for t in o.new_token_ids] == [t for o in alone["free"] for t in o.new_token_ids]
    for rid in ("g", "gp"):
        text = "".join(o.new_text for o in mixed[rid])
        assert re.fullmatch(regex, text), (rid, text)
        assert mixed[rid][-1].finish_reason is FinishReason.STOP and mixed[rid][-1].new_token_ids[-1] == 2
    assert core.reserved == 0
    # a pattern no token sequence can follow is refused with the reason; an abort while compiling leaves nothing
    core.apply([AddRequest("never", [5], SamplingParams(max_tokens=4, guided_regex="\x00\x01"), None, 0.0, seq=4),
                AddRequest("gone", [5], SamplingParams(max_tokens=4, guided_regex="[a-z]{1,3}"), None, 0.0, seq=5),
                Abort("gone")])
    rejected, deadline = [], time.monotonic() + 60
    while not rejected and time.monotonic() < deadline:
        batch = core.step()
        assert not batch.outputs
        rejected = batch.rejected
        time.sleep(0.005)
    assert [r for r, _ in rejected] == ["never"] and isinstance(rejected[0][1], GuideError)
    assert not list(core._compiling) and not core.has_unfinished()


def test_structured_output_needs_a_tokenizer():
    engine = make_engine(tiny_llama())
    with pytest.raises(ValueError, match="structured output needs a tokenizer"):
        engine.add_request("r", [1, 2], SamplingParams(max_tokens=2, guided_regex="a+"), random_prefix(engine, 2, seed=0))


def test_a_pattern_that_compiles_too_long_is_refused_once_and_then_at_once(smollm2_tokenizer):
    from server.engine.guided_decoding import GuideCompiler

    compiler = GuideCompiler(smollm2_tokenizer, smollm2_tokenizer.eos_token_id, timeout_s=1.0)
    slow = json_schema_regex({"type": "string", "maxLength": 40})  # minutes with SmolLM2's tokens
    started = time.monotonic()
    with pytest.raises(GuideError, match="did not compile within 1 s"):
        compiler.index(slow)
    assert time.monotonic() - started < 10
    started = time.monotonic()
    with pytest.raises(GuideError, match="did not compile within 1 s"):
        compiler.index(slow)  # remembered: no second compile
    assert time.monotonic() - started < 0.1
    quick = json_schema_regex({"type": "string", "maxLength": 5})
    assert compiler.guide(quick).get_tokens()  # the compiler still works
