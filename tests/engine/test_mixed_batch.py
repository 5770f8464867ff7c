"""Requests with different prefixes in one packed batch give the tokens they give alone."""

from __future__ import annotations

import pytest

from server.prefix import compose
from server.engine.sampling_params import SamplingParams
from tests.factories import make_engine, random_prefix, tiny_gpt2, tiny_llama


def _workload(engine):
    p3, p7, p16 = (random_prefix(engine, n, seed=n) for n in (3, 7, 16))
    pair = compose([p3, p7])  # a task prefix, then a user's prefix
    prefixes = [p3, p7, None, p16, pair, p3, p7, pair, None, p16]
    prompts = [[(11 * i + j) % 300 + 3 for j in range(2 + 3 * i)] for i in range(len(prefixes))]
    max_tokens = [5 + (i * 7) % 13 for i in range(len(prefixes))]
    join_at = [0, 0, 1, 1, 2, 3, 3, 5, 8, 9]  # step at which each request is added
    return prefixes, prompts, max_tokens, join_at


def _alone(engine, prompt, prefix, max_tokens):
    return engine.generate([prompt], SamplingParams(max_tokens=max_tokens, ignore_eos=True), [prefix])[0].output_token_ids


@pytest.mark.parametrize("make_base", [tiny_llama, tiny_gpt2], ids=["llama-gqa", "gpt2"])
@pytest.mark.parametrize("budget", [1024, 8], ids=["whole-prefill", "chunked-prefill"])
def test_mixed_prefixes_equal_alone(make_base, budget):
    engine = make_engine(make_base(), num_blocks=256, max_num_batched_tokens=budget)
    prefixes, prompts, max_tokens, join_at = _workload(engine)
    expected = [_alone(engine, p, pre, m) for p, pre, m in zip(prompts, prefixes, max_tokens)]

    got: dict[str, list[int]] = {}
    step, pending = 0, list(range(len(prompts)))
    max_batch = 0
    while pending or engine.has_unfinished():
        for i in [i for i in pending if join_at[i] <= step]:
            engine.add_request(f"r{i}", prompts[i], SamplingParams(max_tokens=max_tokens[i], ignore_eos=True), prefixes[i])
            pending.remove(i)
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
        max_batch = max(max_batch, engine.stats().last_step_requests)
        step += 1
    assert max_batch >= (6 if budget > 100 else 4), "the requests never actually shared a step"
    for i, want in enumerate(expected):
        assert got[f"r{i}"] == want, f"request {i} (prefix len {prefixes[i].length if prefixes[i] else 0})"
    assert engine.kv.pool.num_free == engine.kv.pool.num_blocks - engine.kv.prefixes.num_blocks


def test_shared_prefix_blocks_are_shared_not_copied():
    engine = make_engine(tiny_llama(), num_blocks=64, block_size=4)
    prefix = random_prefix(engine, 10, seed=1)  # 3 blocks
    for i in range(4):
        engine.add_request(f"r{i}", [3, 4, 5], SamplingParams(max_tokens=3), prefix)
    engine.step()
    running = engine.scheduler.running
    assert len(running) == 4
    assert all(r.prefix_blocks == running[0].prefix_blocks for r in running)
    assert engine.kv.prefixes.get(prefix.key).users == 4
    assert engine.kv.prefixes.num_blocks == 3
