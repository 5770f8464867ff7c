"""A trained task ++ user prefix, served by the engine, is what the trainer trained."""

from __future__ import annotations

import torch

from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.sampling_params import SamplingParams
from server.training.prefix_forward import forward_with_prefix
from tests.factories import greedy_generate
from tests.training.conftest import MEMORY_EXAMPLES


def test_engine_serves_task_then_user_as_trained(task_then_user):
    model, tok, data, task_kv, result = task_then_user
    composed = torch.cat([task_kv, result.kv], dim=3)  # [L, 2, Hkv, 12 + 8, hd]
    engine = LLMEngine(model, tok, EngineConfig(block_size=4, num_blocks=64))
    prefix = engine.make_prefix(composed)
    prompts = [list(e.prompt_ids) for e in data]
    served = engine.generate(prompts, SamplingParams(max_tokens=20), [prefix] * len(prompts))
    for example, request, (_, completion) in zip(data, served, MEMORY_EXAMPLES):
        reference = greedy_generate(model, composed, list(example.prompt_ids), 20, tok.eos_token_id)
        assert request.output_token_ids == reference == list(example.completion_ids)
        assert request.output_text == completion
    ids = list(data[0].prompt_ids + data[0].completion_ids)
    with torch.no_grad():
        expected = forward_with_prefix(model, composed, torch.tensor([ids]))[0]
    torch.testing.assert_close(engine.score(ids, prefix), expected, atol=1e-4, rtol=1e-4)
