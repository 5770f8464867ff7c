"""One request must never take the engine down: every sampling field's whole range is either
refused when the request is made or served, and a request that fails inside a step fails
alone while the others in the same batch finish with the right tokens."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.engine import llm_engine
from server.engine.outputs import FinishReason
from server.engine.sampling_params import SamplingParams
from tests.factories import make_engine, random_prefix, tiny_llama

PROMPT = [5, 17, 42, 7]
NEIGHBOUR = [9, 3, 250]

any_int = st.one_of(st.integers(-(2**70), 2**70), st.sampled_from([0, 1, 2**63 - 1, 2**63, -1, 2**64]))
any_float = st.one_of(st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True),
                      st.sampled_from([0.0, 1e-45, 5e-324, 1e-3, 1e-300, 100.0, 1e308, -0.0]))
fields = st.fixed_dictionaries({}, optional={
    "temperature": any_float, "top_p": any_float, "top_k": any_int, "seed": st.one_of(st.none(), any_int),
    "max_tokens": st.one_of(any_int, st.integers(1, 6))})


@pytest.fixture(scope="module")
def engine():
    return make_engine(tiny_llama(), num_blocks=256)


@pytest.fixture(scope="module")
def neighbour_tokens(engine):
    """What the well-behaved request next to the random one must produce."""
    return engine.generate([NEIGHBOUR], SamplingParams(max_tokens=6, ignore_eos=True))[0].output_token_ids


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kwargs=fields)
def test_every_sampling_value_is_refused_up_front_or_served(engine, neighbour_tokens, kwargs):
    try:
        params = SamplingParams(**kwargs)
    except ValueError:
        return  # refused when the request is made: the engine never sees it
    assert params.seed is None or 0 <= params.seed < 2**63
    assert params.temperature == 0 or params.temperature >= 1e-3
    assert math.isfinite(params.top_p)
    try:
        engine.check_request(PROMPT, params, None)
    except ValueError:
        return  # e.g. max_tokens beyond the context: refused at add time
    params = SamplingParams(**{**kwargs, "max_tokens": min(params.max_tokens, 6)})
    random_req, neighbour = engine.generate(
        [PROMPT, NEIGHBOUR], [params, SamplingParams(max_tokens=6, ignore_eos=True)])
    assert random_req.finish_reason in (FinishReason.STOP, FinishReason.LENGTH), random_req.error
    assert neighbour.output_token_ids == neighbour_tokens
    assert engine.kv.pool.num_free == engine.kv.pool.num_blocks  # nothing leaked


def _run_batch(engine, seeds: list[int], bad: set[int] | None = None):
    """Three requests in one batch (two with prefixes); returns the finished Requests."""
    prefixes = [random_prefix(engine, 4, seed=1), None, random_prefix(engine, 6, seed=2)]
    params = [SamplingParams(max_tokens=8, temperature=0.8, seed=s, ignore_eos=True) for s in seeds]
    return engine.generate([PROMPT, NEIGHBOUR, [4, 4, 4]], params, prefixes)


def test_a_request_whose_sampling_raises_fails_alone(monkeypatch):
    engine = make_engine(tiny_llama(), num_blocks=128)
    want = [r.output_token_ids for r in _run_batch(engine, [1, 2, 3])]
    real_sample = llm_engine.sample

    def sample_that_breaks_on_seed_666(logits, params, index, samples):
        if any(p.seed == 666 for p in params):
            raise RuntimeError("sampler bug")
        return real_sample(logits, params, index, samples)

    monkeypatch.setattr(llm_engine, "sample", sample_that_breaks_on_seed_666)
    got = _run_batch(engine, [1, 666, 3])
    assert got[1].finish_reason == FinishReason.ERROR and "sampler bug" in got[1].error
    assert [got[0].output_token_ids, got[2].output_token_ids] == [want[0], want[2]]
    assert engine.kv.pool.num_free == engine.kv.pool.num_blocks - engine.kv.prefixes.num_blocks
    assert not engine.has_unfinished()


def test_a_request_whose_detokenization_raises_fails_alone(monkeypatch):
    engine = make_engine(tiny_llama(), num_blocks=128)
    want = [r.output_token_ids for r in _run_batch(engine, [1, 2, 3])]
    real_update = engine.detokenizer.update

    def update(req):
        if req.sampling.seed == 2 and len(req.output_token_ids) == 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad byte")
        real_update(req)

    monkeypatch.setattr(engine.detokenizer, "update", update)
    got = _run_batch(engine, [1, 2, 3])
    assert got[1].finish_reason == FinishReason.ERROR and len(got[1].output_token_ids) == 3
    assert [got[0].output_token_ids, got[2].output_token_ids] == [want[0], want[2]]


def test_a_failed_forward_fails_its_step_and_the_engine_goes_on(monkeypatch):
    engine = make_engine(tiny_llama(), num_blocks=128)
    want = [r.output_token_ids for r in _run_batch(engine, [1, 2, 3])]
    real_execute = engine.runner.execute
    calls = {"n": 0}

    def execute_once_broken(inp):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of memory")
        return real_execute(inp)

    monkeypatch.setattr(engine.runner, "execute", execute_once_broken)
    failed = _run_batch(engine, [1, 2, 3])
    assert all(r.finish_reason == FinishReason.ERROR and "out of memory" in r.error for r in failed)
    assert engine.kv.pool.num_free == engine.kv.pool.num_blocks - engine.kv.prefixes.num_blocks
    assert [r.output_token_ids for r in _run_batch(engine, [1, 2, 3])] == want


def test_seeds_near_the_64_bit_limit_sample_deterministically():
    engine = make_engine(tiny_llama(), num_blocks=64)
    p = SamplingParams(max_tokens=6, temperature=1.0, seed=2**63 - 1, ignore_eos=True)
    a = engine.generate([PROMPT], p)[0].output_token_ids
    assert a == engine.generate([PROMPT], p)[0].output_token_ids
    assert torch.tensor(a).max() < 320
