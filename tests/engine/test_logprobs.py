"""Logprobs in float32: the sampled tokens' and the prompt's equal PEFT's log_softmax, with
one prefix, composed prefixes, in a mixed batch and across prefill chunks."""

from __future__ import annotations

import pytest
import torch

from server.engine.sampling_params import SamplingParams
from server.prefix import compose
from tests.factories import make_engine, peft_prefix_model, random_prefix, save_and_load_prefix, tiny_llama

PROMPT = [5, 17, 42, 7, 99, 3, 250, 11, 64, 8]
TOP = 5


def _peft_logprobs(peft_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(peft_model(torch.tensor([ids])).logits[0].float(), dim=-1)


def _concatenated_peft(base, parts):
    """A PEFT model whose prefix is the concatenation of `parts`' prefixes (plain PEFT
    prefixes store the past_key_values themselves): exactly what composing them means."""
    model = peft_prefix_model(base, num_virtual_tokens=sum(p.peft_config["default"].num_virtual_tokens for p in parts))
    weight = torch.cat([p.prompt_encoder["default"].embedding.weight for p in parts])
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(weight)
    return model


def _check(req, reference: torch.Tensor, prompt: list[int]) -> None:
    ids = prompt + req.output_token_ids
    assert req.prompt_logprobs[0] is None and len(req.prompt_logprobs) == len(prompt)
    scored = [(t, req.prompt_logprobs[t]) for t in range(1, len(prompt))] + \
             [(len(prompt) + i, lp) for i, lp in enumerate(req.logprobs)]
    assert len(req.logprobs) == len(req.output_token_ids)
    for t, lp in scored:  # the row of token t - 1 predicts token t
        want = reference[t - 1]
        assert lp.token_id == ids[t]
        assert abs(lp.logprob - want[ids[t]].item()) < 1e-4
        best = torch.topk(want, TOP)
        assert [i for i, _ in lp.top] == best.indices.tolist()
        assert max(abs(v - w) for (_, v), w in zip(lp.top, best.values.tolist())) < 1e-4
    assert abs(req.cumulative_logprob - sum(lp.logprob for lp in req.logprobs)) < 1e-6


@pytest.mark.parametrize("budget", [1024, 3], ids=["whole-prefill", "chunked-prefill"])
def test_logprobs_equal_peft_log_softmax(budget):
    base = tiny_llama()
    engine = make_engine(tiny_llama(), num_blocks=256, max_num_batched_tokens=budget)
    one, two = (peft_prefix_model(tiny_llama(), num_virtual_tokens=n, seed=n) for n in (4, 6))
    p_one, p_two = (engine.make_prefix(save_and_load_prefix(m, engine.spec)) for m in (one, two))
    both = _concatenated_peft(base, [one, two])
    params = SamplingParams(max_tokens=6, ignore_eos=True, logprobs=TOP, prompt_logprobs=TOP)
    others = SamplingParams(max_tokens=9, ignore_eos=True)  # a mixed batch: requests without logprobs
    reqs = engine.generate([PROMPT, [3, 4, 5], PROMPT, PROMPT[:4], [6, 7]],
                           [params, others, params, others, others],
                           [p_one, p_two, compose([p_one, p_two]), None, p_one])
    for req, reference in ((reqs[0], one), (reqs[2], both)):
        _check(req, _peft_logprobs(reference, PROMPT + req.output_token_ids), PROMPT)
    assert reqs[1].logprobs == [] and reqs[1].prompt_logprobs == [None]  # not asked, not computed


def test_logprobs_of_sampled_tokens_are_the_models_not_the_samplers():
    """Temperature and top-k change what is drawn, not the reported distribution."""
    engine = make_engine(tiny_llama(), num_blocks=64)
    prefix = random_prefix(engine, 5, seed=1)
    req = engine.generate([PROMPT], SamplingParams(max_tokens=5, temperature=1.7, top_k=3, seed=4, logprobs=2,
                                                   ignore_eos=True), [prefix])[0]
    logits = engine.score(PROMPT + req.output_token_ids, prefix)
    want = torch.log_softmax(logits, dim=-1)
    for i, lp in enumerate(req.logprobs):
        assert abs(lp.logprob - want[len(PROMPT) - 1 + i, lp.token_id].item()) < 1e-5


def test_max_tokens_zero_scores_the_prompt_and_frees_everything():
    engine = make_engine(tiny_llama(), num_blocks=32, max_num_batched_tokens=4)
    prefix = random_prefix(engine, 3, seed=2)
    (req,) = engine.generate([PROMPT], SamplingParams(max_tokens=0, prompt_logprobs=0), [prefix])
    assert req.output_token_ids == [] and req.finish_reason.value == "length"
    want = torch.log_softmax(engine.score(PROMPT, prefix), dim=-1)
    assert [lp.token_id for lp in req.prompt_logprobs[1:]] == PROMPT[1:]
    assert all(abs(lp.logprob - want[t - 1, PROMPT[t]].item()) < 1e-5 and lp.top == ()
               for t, lp in enumerate(req.prompt_logprobs[1:], start=1))
    assert not engine.requests and engine.kv.pool.num_free == 32 - engine.kv.prefixes.num_blocks


def test_a_preempted_request_reports_its_prompt_logprobs_once():
    """A request recomputed after preemption scores its prompt again internally, but its
    prompt logprobs stay one per token and are sent once."""
    engine = make_engine(tiny_llama(), num_blocks=10, block_size=4, max_num_batched_tokens=64)
    params = SamplingParams(max_tokens=14, ignore_eos=True, prompt_logprobs=1, logprobs=1)
    outs = {}
    for i in range(3):
        engine.add_request(f"r{i}", PROMPT, params)
    while engine.has_unfinished():
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
    assert engine.scheduler.num_preemptions > 0
    for rid, seq in outs.items():
        sent = [o.prompt_logprobs for o in seq if o.prompt_logprobs is not None]
        assert len(sent) == 1 and len(sent[0]) == len(PROMPT)
        assert sum(len(o.logprobs) for o in seq) == 14
