"""Sampling: greedy, seeds, top-k/top-p, EOS, stop strings and incremental text."""

from __future__ import annotations

import torch

from server.engine.detokenizer import emittable, find_stop
from server.engine.sampler import sample
from server.engine.sampling_params import SamplingParams
from tests.factories import make_engine, random_prefix, tiny_llama


def test_same_seed_same_tokens_alone_or_batched():
    engine = make_engine(tiny_llama(), num_blocks=128)
    prefix = random_prefix(engine, 5, seed=1)
    p = SamplingParams(max_tokens=16, temperature=1.0, seed=1234, ignore_eos=True)
    alone = engine.generate([[5, 6, 7]], p, [prefix])[0].output_token_ids
    batch = engine.generate([[9, 9], [5, 6, 7], [4]], [SamplingParams(max_tokens=8, temperature=1.0), p,
                                                       SamplingParams(max_tokens=3)], [None, prefix, None])
    assert batch[1].output_token_ids == alone
    other = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=16, temperature=1.0, seed=99, ignore_eos=True),
                            [prefix])[0].output_token_ids
    assert other != alone


def test_top_k_one_is_greedy_and_top_p_keeps_the_head():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    greedy = logits.argmax(-1).tolist()
    assert sample(logits, [SamplingParams(temperature=2.0, top_k=1, seed=s) for s in range(4)], [0] * 4) == greedy
    assert sample(logits, [SamplingParams(temperature=1.0, top_p=1e-6, seed=s) for s in range(4)], [0] * 4) == greedy
    logits = torch.tensor([[0.0, 10.0, 9.9, -5.0]])
    draws = {sample(logits, [SamplingParams(temperature=1.0, top_k=2, seed=s)], [0])[0] for s in range(40)}
    assert draws == {1, 2}


def test_eos_stops_unless_ignored():
    engine = make_engine(tiny_llama())
    free = engine.generate([[5, 6]], SamplingParams(max_tokens=6, ignore_eos=True))[0].output_token_ids
    engine.eos_token_ids = {free[2]}
    req = engine.generate([[5, 6]], SamplingParams(max_tokens=6))[0]
    assert req.output_token_ids == free[:3] and req.finish_reason.value == "stop"
    req = engine.generate([[5, 6]], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    assert req.output_token_ids == free and req.finish_reason.value == "length"


class CharTokenizer:
    """One character per token: token t decodes to chr(ord('a') + t % 26)."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + t % 26) for t in ids)


def test_stop_string_cuts_text_and_finishes():
    engine = make_engine(tiny_llama(), tokenizer=CharTokenizer())
    full = engine.generate([[5, 6]], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    stop = full.output_text[4:6]
    req = engine.generate([[5, 6]], SamplingParams(max_tokens=12, stop=(stop,), ignore_eos=True))[0]
    cut = full.output_text.find(stop)
    assert req.output_text == full.output_text[:cut]
    assert req.finish_reason.value == "stop"

    # Streamed deltas never leak the beginning of a stop string and add up to the text.
    engine.add_request("s", [5, 6], SamplingParams(max_tokens=12, stop=(stop,), ignore_eos=True))
    text = ""
    while engine.has_unfinished():
        for out in engine.step():
            text += out.new_text
    assert text == full.output_text[:cut]


def test_stop_helpers():
    assert find_stop("hello world", ("lo w",), new_chars=6) == 3
    assert find_stop("hello world", ("lo w",), new_chars=3) is None  # ended before the new text
    assert find_stop("hello world", ("xyz",), new_chars=3) is None
    assert emittable("abcdef", ("xyz",), finished=False) == 4
    assert emittable("abcdef", ("xyz",), finished=True) == 6


def test_greedy_takes_the_first_of_tied_maxima():
    """As argmax (HF's greedy) does: bfloat16 logits tie often."""
    logits = torch.zeros(3, 50)
    logits[0, [7, 30]] = 2.0
    logits[1, [0, 49]] = 1.0
    logits[2, 11] = 5.0
    assert sample(logits, [SamplingParams()] * 3, [0] * 3) == [7, 0, 11]


def test_sampling_draws_from_the_softmax():
    """Gumbel-max: token 1 has probability 3/4 at temperature 1, 9/10 at temperature 0.5."""
    import math

    logits = torch.tensor([[0.0, math.log(3.0)]]).repeat(2000, 1)
    for temperature, want in ((1.0, 0.75), (0.5, 0.9)):
        params = [SamplingParams(temperature=temperature, seed=s) for s in range(2000)]
        share = sum(sample(logits, params, [0] * 2000)) / 2000
        assert abs(share - want) < 0.03, (temperature, share)


def test_incremental_text_adds_up_to_the_decoded_tokens(smollm2_tokenizer):
    """On the real tokenizer: multi-byte characters split over tokens, special tokens skipped."""
    import random

    from server.engine.detokenizer import Detokenizer
    from server.engine.request import Request

    tok = smollm2_tokenizer
    rng = random.Random(0)
    sequences = [tok("héllo wörld 你好 🙂 <|im_end|> end", add_special_tokens=False)["input_ids"] * 2]
    sequences += [[rng.randrange(len(tok)) for _ in range(30)] for _ in range(50)]
    for ids in sequences:
        for detok in (Detokenizer(tok), _WindowedOnly(tok)):
            req = Request("r", [1], SamplingParams())
            for token in ids:
                req.output_token_ids.append(token)
                detok.update(req)
            assert req.output_text == tok.decode(ids, skip_special_tokens=True)


class _WindowedOnly:
    """The detokenizer's path for tokenizers without a DecodeStream."""

    def __new__(cls, tokenizer):
        from server.engine.detokenizer import Detokenizer

        d = Detokenizer(tokenizer)
        d._backend = None
        return d
