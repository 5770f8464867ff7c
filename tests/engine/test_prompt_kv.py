"""Prompt prefixes: the keys and values the model computes for a text, served as a prefix,
give exactly what sending the text in the prompt gives (float32 logits within 1e-4, the same
greedy tokens), alone, in a mixed batch, and composed with tuned prefixes."""

from __future__ import annotations

import pytest
import torch

from server.engine.sampling_params import SamplingParams
from server.prefix import compose
from tests.factories import hf_prefix_logits, make_engine, random_prefix, tiny_gpt2, tiny_llama, tiny_qwen3

TEXT = [5, 17, 42, 7, 99, 3, 250, 11, 64, 8, 9, 33, 120, 77]  # a "system prompt": 14 tokens
CONTINUATIONS = [[44, 55, 66], [12], [200, 201, 202, 203, 204, 205]]


def _greedy(engine, prompts, prefixes, n=10):
    return [r.output_token_ids for r in engine.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True),
                                                         prefixes)]


@pytest.mark.parametrize("make_base", [tiny_llama, tiny_gpt2, tiny_qwen3], ids=["llama-gqa", "gpt2", "qwen3"])
def test_a_prompt_prefix_equals_sending_its_text(make_base):
    engine = make_engine(make_base(), num_blocks=256, block_size=4, max_num_batched_tokens=5)  # 3 chunks
    kv = engine.prompt_kv(TEXT)
    assert kv.shape == engine.spec.kv_shape(len(TEXT))
    prefix = engine.make_prefix(kv)
    for cont in CONTINUATIONS:
        got = engine.score(cont, prefix)
        want = engine.score(TEXT + cont)[len(TEXT):]
        assert (got - want).abs().max().item() < 1e-4
    tuned = random_prefix(engine, 5, seed=3)  # a mixed batch: other requests, other prefixes
    prompts = [*CONTINUATIONS, [1, 2, 3], TEXT + CONTINUATIONS[0]]
    got = _greedy(engine, prompts, [prefix, prefix, prefix, tuned, None])
    assert got[:3] == _greedy(engine, [TEXT + c for c in CONTINUATIONS], [None] * 3)
    assert got[3] == _greedy(engine, [[1, 2, 3]], [tuned])[0]
    assert got[4] == got[0]
    # computed in one pass or in chunks: the same keys and values
    whole = make_engine(make_base(), num_blocks=256, block_size=4).prompt_kv(TEXT)
    assert (whole - kv).abs().max().item() < 1e-5


def test_prompt_then_tuned_prefix_compose_in_order():
    """[system prompt, task prefix, user prefix]: the segments in that order, as one cache;
    the prompt's keys sit at positions 0..P-1 (rotated), the tuned ones are position-free,
    and the request's tokens follow at the total length."""
    base = tiny_llama()
    engine = make_engine(tiny_llama(), num_blocks=256, block_size=4)
    prompt = engine.make_prefix(engine.prompt_kv(TEXT))
    task, user = random_prefix(engine, 4, seed=1), random_prefix(engine, 3, seed=2)
    stack = compose([prompt, task, user])
    cache = torch.cat([prompt.kv, task.kv, user.kv], dim=3)
    for cont in CONTINUATIONS:
        with torch.no_grad():
            want = hf_prefix_logits(base, cache, cont)
        assert (engine.score(cont, stack) - want).abs().max().item() < 1e-4
    # the prompt prefix alone is exactly the text: the oracle agrees with the text sent in full
    with torch.no_grad():
        assert (hf_prefix_logits(base, prompt.kv, CONTINUATIONS[0]) -
                base(torch.tensor([TEXT + CONTINUATIONS[0]])).logits[0, len(TEXT):]).abs().max().item() < 1e-4


def test_a_text_that_leaves_no_room_is_refused_and_nothing_leaks():
    engine = make_engine(tiny_llama(), num_blocks=256, block_size=4)  # context 256
    free = engine.kv.pool.num_free
    with pytest.raises(ValueError, match="prompt of 256 tokens after a prefix of 0 does not fit the context of 256"):
        engine.prompt_kv([5] * 256)
    assert engine.prompt_kv([5] * 255).shape[3] == 255
    assert engine.kv.pool.num_free == free and not engine.has_unfinished()


@pytest.mark.parametrize("make_base", [tiny_llama, tiny_qwen3], ids=["llama-gqa", "qwen3"])
def test_long_prompt_prefixes_attended_apart_equal_their_text(make_base):
    """Prompt prefixes of at least DENSE_PREFIX_MIN tokens: a prefill chunk of more than
    DECODE_MAX_Q tokens attends to them once per distinct prefix and merges with its own
    part by log-sum-exp (kernels/cpu_attention.py). Several requests on one such prefix, one
    on another, and one on none, in one batch, give what sending each text gives."""
    from kernels import cpu_attention, cpu_ops

    if not cpu_ops.available():
        pytest.skip("the CPU kernels do not build here")
    engine = make_engine(make_base(), num_blocks=512, block_size=4)
    g = torch.Generator().manual_seed(5)
    texts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (cpu_attention.DENSE_PREFIX_MIN + 22,
                                                                         cpu_attention.DENSE_PREFIX_MIN)]
    first, second = (engine.make_prefix(engine.prompt_kv(t)) for t in texts)
    conts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (12, 9, 20, 15, 11)]
    for cont, (prefix, text) in zip(conts[:2], [(first, texts[0]), (second, texts[1])]):
        got, want = engine.score(cont, prefix), engine.score(text + cont)[len(text):]
        assert (got - want).abs().max().item() < 1e-4
    prefixes = [first, first, first, second, None]
    got = _greedy(engine, conts, prefixes)
    assert got[:4] == _greedy(engine, [texts[0] + c for c in conts[:3]] + [texts[1] + conts[3]], [None] * 4)
    assert got[4] == _greedy(engine, [conts[4]], [None])[0]
