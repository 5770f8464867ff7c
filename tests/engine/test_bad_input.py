"""Bad input: a clear error naming the numbers, and the engine state unchanged."""

from __future__ import annotations

import pytest
import torch

from server.prefix import Prefix, PrefixError
from server.prefix.peft_format import kv_from_prompt_embeddings
from server.engine.sampling_params import SamplingParams
from tests.factories import make_engine, tiny_llama

# tiny_llama: 2 layers, 2 kv heads, head_dim 16, context 256


def _state(engine):
    return (engine.kv.pool.num_free, len(engine.requests), len(engine.scheduler.waiting),
            len(engine.scheduler.running), len(engine.kv.prefixes))


@pytest.mark.parametrize("shape_or_tensor, message", [
    ((3, 2, 2, 4, 16), "prefix has 3 layers, model has 2"),
    ((2, 2, 3, 4, 16), "prefix has 3 kv heads, model has 2"),
    ((2, 2, 2, 4, 8), "prefix has head_dim 8, model has 16"),
    ((2, 3, 2, 4, 16), "dim 1 is 3; expected 2"),
    ((2, 2, 4, 16), "has 4 dims"),
    (torch.zeros(2, 2, 2, 4, 16, dtype=torch.int64), "dtype int64"),
    (torch.full((2, 2, 2, 4, 16), float("nan")), "512 non-finite values"),
    (torch.full((2, 2, 2, 4, 16), float("inf")), "non-finite"),
], ids=["layers", "kv-heads", "head-dim", "kv-pair", "rank", "dtype", "nan", "inf"])
def test_bad_prefix_is_refused_everywhere(shape_or_tensor, message):
    engine = make_engine(tiny_llama())
    kv = shape_or_tensor if isinstance(shape_or_tensor, torch.Tensor) else torch.zeros(shape_or_tensor)
    before = _state(engine)
    with pytest.raises(PrefixError, match=message):
        engine.make_prefix(kv)
    assert _state(engine) == before and "r" not in engine.requests


def _one_at(value: float, dtype=torch.float32) -> torch.Tensor:
    kv = torch.zeros(2, 2, 2, 4, 16, dtype=dtype)
    kv[1, 0, 1, 2, 7] = value
    return kv


@pytest.mark.parametrize("kv, bad", [
    (_one_at(float("nan")), 1),
    (_one_at(float("-inf"), torch.bfloat16), 1),
    (torch.cat([torch.full((1, 2, 2, 4, 16), 3e38), _one_at(float("inf"))[1:]]), 1),  # the sum overflows too
    (torch.full((2, 2, 2, 4, 16), 3e38), 0),  # finite, though its float32 sum is inf
    (torch.full((2, 2, 2, 4, 16), 6e4, dtype=torch.float16), 0),  # finite, its float16 sum would not be
], ids=["one-nan", "one-inf-bf16", "inf-among-huge", "huge-finite", "large-fp16"])
def test_the_finiteness_check_finds_one_bad_value_and_refuses_no_good_one(kv, bad):
    engine = make_engine(tiny_llama())
    if bad:
        with pytest.raises(PrefixError, match=f"{bad} non-finite values"):
            engine.make_prefix(kv)
    else:
        assert torch.equal(engine.make_prefix(kv).kv, kv.to(engine.dtype))


def test_a_prefix_checked_against_another_model_is_refused_at_add_time():
    engine = make_engine(tiny_llama())
    other = make_engine(tiny_llama(seed=1))  # same shapes, other weights
    foreign = other.make_prefix(torch.zeros(2, 2, 2, 4, 16))
    before = _state(engine)
    with pytest.raises(PrefixError, match=f"checked against another model .fingerprint {other.spec.fingerprint}"):
        engine.add_request("r", [3, 4], SamplingParams(), foreign)
    # a hand-built Prefix must name the spec it was checked against: the engine trusts only its own
    with pytest.raises(PrefixError, match="another model"):
        engine.add_request("r", [3, 4], SamplingParams(), Prefix(kv=torch.zeros(2, 2, 2, 4, 16), spec=other.spec))
    assert _state(engine) == before and "r" not in engine.requests


def test_prompt_embeddings_with_wrong_width_names_the_numbers():
    engine = make_engine(tiny_llama())
    with pytest.raises(PrefixError, match=r"num_layers\(2\) \* 2 \* num_kv_heads\(2\) \* head_dim\(16\) = 128"):
        kv_from_prompt_embeddings(torch.zeros(4, 100), engine.spec)


def test_prompt_longer_than_the_context():
    engine = make_engine(tiny_llama(), num_blocks=512)
    before = _state(engine)
    with pytest.raises(ValueError, match="prompt of 300 tokens after a prefix of 0 does not fit the context of 256"):
        engine.add_request("r", [3] * 300, SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match=r"prefix 0 \+ prompt 200 \+ max_tokens 100 = 300 exceeds the context of 256"):
        engine.add_request("r", [3] * 200, SamplingParams(max_tokens=100))
    assert _state(engine) == before


def test_request_larger_than_the_whole_pool():
    engine = make_engine(tiny_llama(), num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="needs 5 KV blocks of 4 tokens; the pool has 4"):
        engine.add_request("r", [3] * 10, SamplingParams(max_tokens=10))
    assert not engine.has_unfinished()


@pytest.mark.parametrize("kwargs, message", [
    ({"max_tokens": 0}, "max_tokens 0 only scores the prompt: it needs prompt_logprobs"),
    ({"max_tokens": -5}, "max_tokens must be a non-negative integer, got -5"),
    ({"n": 0}, "n must be an integer from 1 to 64, got 0"),
    ({"n": 65}, "n must be an integer from 1 to 64, got 65"),
    ({"logprobs": 21}, "logprobs must be an integer from 0 to 20, got 21"),
    ({"prompt_logprobs": -1}, "prompt_logprobs must be an integer from 0 to 20, got -1"),
    ({"temperature": -1.0}, r"temperature must be 0 \(greedy\) or between 0.001 and 100, got -1.0"),
    ({"temperature": 1e-45}, "temperature must be 0 .greedy. or between 0.001"),
    ({"temperature": float("nan")}, "temperature must be 0"),
    ({"top_p": 0.0}, "top_p must be in"),
    ({"top_p": float("inf")}, "top_p must be in"),
    ({"top_k": -1}, "top_k must be 0"),
    ({"seed": 2**63}, r"seed must be an integer from 0 to 9223372036854775807 \(2\^63 - 1\), got 9223372036854775808"),
    ({"seed": -1}, "seed must be an integer from 0"),
    ({"stop": ["", "x"]}, "stop strings must be non-empty text of at most 256 characters"),
    ({"stop": ["x"] * 17}, "17 stop strings; at most 16 are allowed"),
])
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_empty_prompt_duplicate_id_and_out_of_vocab_token():
    engine = make_engine(tiny_llama())
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.add_request("a", [], SamplingParams())
    with pytest.raises(ValueError, match=r"token id 999 outside the vocabulary \[0, 320\)"):
        engine.add_request("a", [3, 999], SamplingParams())
    engine.add_request("a", [3], SamplingParams())
    with pytest.raises(ValueError, match="'a' is already in use"):
        engine.add_request("a", [3], SamplingParams())
    assert len(engine.requests) == 1
