"""PEFT parity in float32: prefill logits and greedy tokens, for every supported architecture."""

from __future__ import annotations

import pytest
import torch

from server.engine.sampling_params import SamplingParams
from tests.factories import (make_engine, peft_prefix_model, save_and_load_prefix, tiny_gpt2, tiny_llama, tiny_qwen2,
                             tiny_qwen3)

PROMPT = [5, 17, 42, 7, 99, 3, 250, 11]


def _peft_greedy(peft_model, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    out = peft_model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("make_base", [tiny_gpt2, tiny_llama, tiny_qwen2, tiny_qwen3],
                         ids=["gpt2", "llama-gqa", "qwen2-gqa", "qwen3-gqa"])
@pytest.mark.parametrize("projection", [False, True], ids=["plain", "mlp-projection"])
def test_tiny_models_match_peft(make_base, projection):
    engine = make_engine(make_base())
    peft_model = peft_prefix_model(make_base(), num_virtual_tokens=6, prefix_projection=projection, seed=3)
    prefix = engine.make_prefix(save_and_load_prefix(peft_model, engine.spec))
    with torch.no_grad():
        expected = peft_model(torch.tensor([PROMPT])).logits[0]
    got = engine.score(PROMPT, prefix)
    assert (got - expected).abs().max().item() < 1e-4
    # The prefix matters: without it the logits are far away.
    assert (engine.score(PROMPT, None) - expected).abs().max().item() > 1e-2

    want = _peft_greedy(peft_model, PROMPT, 24)
    req = engine.generate([PROMPT], SamplingParams(max_tokens=24, ignore_eos=True), [prefix])[0]
    assert req.output_token_ids == want


def test_base_model_without_prefix_matches_hf():
    base = tiny_llama()
    engine = make_engine(base)
    with torch.no_grad():
        expected = base(torch.tensor([PROMPT])).logits[0]
    assert (engine.score(PROMPT) - expected).abs().max().item() < 1e-4


@pytest.mark.slow
def test_smollm2_matches_peft(smollm2_fp32):
    from transformers import AutoModelForCausalLM

    model, tokenizer, path = smollm2_fp32
    engine = make_engine(model, num_blocks=128, block_size=16, tokenizer=tokenizer)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    peft_model = peft_prefix_model(reference, num_virtual_tokens=16, prefix_projection=True, seed=5)
    prefix = engine.make_prefix(save_and_load_prefix(peft_model, engine.spec))
    ids = tokenizer("The capital of France is a city called", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = peft_model(torch.tensor([ids])).logits[0]
    got = engine.score(ids, prefix)
    assert (got - expected).abs().max().item() < 1e-3
    want = _peft_greedy(peft_model, ids, 24)
    req = engine.generate([ids], SamplingParams(max_tokens=24, ignore_eos=True), [prefix])[0]
    assert req.output_token_ids == want
