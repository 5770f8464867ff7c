"""A long prompt shares the engine (issue: while tenant A's 8,000-token prompt prefilled, tenant
B's 1-token request waited for all of it). On a tiny Llama with SmolLM2's 8192-token context,
counted in steps: B's request, sent while A's prompt prefills, finishes in the next step with
the tokens it gets alone, and A's prompt goes on in chunks that shrink as its context grows
(prefill_attention_budget), so that each step stays short."""

from __future__ import annotations

import torch

from server.engine.sampling_params import SamplingParams
from tests.factories import make_engine, tiny_llama

CONTEXT = 8192


def test_a_short_request_of_another_tenant_finishes_while_a_long_prompt_prefills():
    model = tiny_llama(0, max_positions=CONTEXT)
    g = torch.Generator().manual_seed(0)
    long_prompt = torch.randint(3, 320, (8000,), generator=g).tolist()
    short_prompt = [5, 17, 42, 99, 7]
    engine = make_engine(model, num_blocks=700, block_size=16, max_model_len=CONTEXT)
    alone = engine.generate([short_prompt], SamplingParams(max_tokens=1))[0].output_token_ids

    engine.add_request("a", long_prompt, SamplingParams(max_tokens=2), tenant="tenant-a")
    chunks = []
    for _ in range(2):
        engine.step()
        chunks.append(engine.stats().last_step_tokens)
    [a] = engine.requests["a"]  # its one sample
    assert a.num_computed_tokens == sum(chunks) < 8000 and not a.output_token_ids  # still prefilling

    engine.add_request("b", short_prompt, SamplingParams(max_tokens=1), tenant="tenant-b")
    outputs = engine.step()
    assert [o.request_id for o in outputs] == ["b"] and outputs[0].finished  # the very next step
    assert outputs[0].new_token_ids == alone  # exact: what it gets alone (float32)
    assert engine.stats().last_step_requests == 2 and not a.is_finished  # beside a chunk of a's prompt

    for _ in range(2):
        engine.step()
        chunks.append(engine.stats().last_step_tokens)
    budget = engine.config.prefill_attention_budget
    assert chunks[0] == engine.config.max_num_batched_tokens  # short context: the whole token budget
    assert chunks[-1] * (a.num_computed_tokens) <= budget < 1024 * a.num_computed_tokens  # long: cut to the budget
    engine.abort("a")
    assert engine.kv.num_free == engine.kv.num_blocks
