"""n samples of one prompt: they share the prefix's and the prompt's KV blocks, and give the
tokens they give when each computes the prompt itself."""

from __future__ import annotations

from server.engine.sampling_params import SamplingParams
from tests.factories import make_engine, random_prefix, tiny_llama

PROMPT = [5, 17, 42, 7, 99, 3, 250, 11, 64, 8, 9]  # 11 tokens: 2 full blocks of 4 and a partial one


def _tokens(reqs):
    return [r.output_token_ids for r in reqs]


def test_forked_samples_hold_shared_blocks_while_running():
    engine = make_engine(tiny_llama(), num_blocks=64, block_size=4)
    prefix = random_prefix(engine, 6, seed=1)
    engine.add_request("r", PROMPT, SamplingParams(n=4, max_tokens=5, temperature=1.0, seed=3, ignore_eos=True),
                       prefix)
    engine.step()
    samples = engine.requests["r"]
    assert [s.index for s in samples] == [0, 1, 2, 3] and all(s.status.value == "running" for s in samples)
    # 12 own slots after the first token: blocks 0 and 1 shared by all four, the third copied
    first = samples[0].own_blocks
    for s in samples[1:]:
        assert s.own_blocks[:2] == first[:2] and s.own_blocks[2] not in first
        assert s.prefix_blocks == samples[0].prefix_blocks
    prefix_blocks = engine.kv.prefixes.num_blocks
    assert engine.kv.pool.num_free == 64 - prefix_blocks - 2 - 4  # 2 shared + 4 private tails
    assert engine.kv.prefixes.get(prefix.key).users == 4
    # the forks run as their tenant's requests: fair shares count them, and each one's end
    # takes only itself off (a fork ending early once left its parent's tenant uncounted)
    assert engine.scheduler.num_running_of[""] == 4
    while engine.has_unfinished():
        engine.step()
    assert engine.kv.pool.num_free == 64 - prefix_blocks and engine.kv.prefixes.get(prefix.key).users == 0
    assert len({tuple(s.output_token_ids) for s in samples}) > 1  # the samples drew apart


def test_samples_equal_samples_that_computed_the_prompt_themselves(monkeypatch):
    params = SamplingParams(n=5, max_tokens=12, temperature=0.9, seed=11, ignore_eos=True, logprobs=1)
    results = []
    for share in (True, False):
        engine = make_engine(tiny_llama(), num_blocks=128, block_size=4, max_num_batched_tokens=5)
        if not share:  # every fork finds no free block: each sample prefills the prompt alone
            monkeypatch.setattr(engine.kv, "fork", lambda parent, child, n: False)
        prefix = random_prefix(engine, 7, seed=2)
        reqs = engine.generate([PROMPT, [4, 5, 6]], [params, SamplingParams(max_tokens=7, ignore_eos=True)],
                               [prefix, None])
        results.append((_tokens(reqs), [[round(lp.logprob, 4) for lp in r.logprobs] for r in reqs[:5]]))
        assert not engine.requests and engine.kv.pool.num_free == 128 - engine.kv.prefixes.num_blocks
    assert results[0] == results[1]


def test_sample_zero_is_the_single_sample_and_greedy_samples_agree():
    engine = make_engine(tiny_llama(), num_blocks=128, block_size=4)
    prefix = random_prefix(engine, 3, seed=5)
    seeded = SamplingParams(max_tokens=10, temperature=1.0, seed=7, ignore_eos=True)
    single = _tokens(engine.generate([PROMPT], seeded, [prefix]))[0]
    four = _tokens(engine.generate([PROMPT], SamplingParams(**{**seeded.__dict__, "n": 4}), [prefix]))
    again = _tokens(engine.generate([PROMPT], SamplingParams(**{**seeded.__dict__, "n": 4}), [prefix]))
    assert four[0] == single and four == again
    greedy = _tokens(engine.generate([PROMPT], SamplingParams(n=3, max_tokens=10, ignore_eos=True), [prefix]))
    assert greedy[0] == greedy[1] == greedy[2]


def test_abort_before_the_fork_finishes_every_sample():
    engine = make_engine(tiny_llama(), num_blocks=64, block_size=4, max_num_batched_tokens=4)
    engine.add_request("r", PROMPT, SamplingParams(n=3, max_tokens=5, ignore_eos=True))
    engine.step()  # the first prompt chunk: no fork yet
    outs = engine.abort("r")
    assert [(o.index, o.finished, o.finish_reason.value) for o in outs] == [(i, True, "abort") for i in range(3)]
    assert not engine.has_unfinished() and not engine.requests and engine.kv.pool.num_free == 64


def test_a_failure_before_the_fork_fails_every_sample(monkeypatch):
    engine = make_engine(tiny_llama(), num_blocks=64, block_size=4)
    engine.add_request("r", PROMPT, SamplingParams(n=3, max_tokens=5, ignore_eos=True))

    def broken(*args):
        raise RuntimeError("forward broke")

    monkeypatch.setattr(engine.runner, "execute", broken)
    outs = engine.step()
    assert sorted((o.index, o.finish_reason.value) for o in outs) == [(0, "error"), (1, "error"), (2, "error")]
    assert all("forward broke" in o.error for o in outs)
    assert not engine.requests and engine.kv.pool.num_free == 64
