"""lm-evaluation-harness's `local-completions` run against a real server, as the README says
to evaluate a prefix: every loglikelihood it reports equals PEFT's, on the token split it
made through the server's /tokenize."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.api.harness import MODEL_NAME, upload
from tests.factories import tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

ITEMS = [
    {"prompt": "the quick brown fox", "choices": ["jumps over the dog", "sat on the mat", "hello world"], "gold": 0},
    {"prompt": "hello world, how are", "choices": ["you today?", "the cat", "prefix tuning"], "gold": 0},
    {"prompt": "the cat sat on", "choices": ["the mat", "the fox", "today"], "gold": 0},
    {"prompt": "prefix tuning serves", "choices": ["many tasks", "the dog", "how are you"], "gold": 1},
]


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory) -> Path:
    from eval_harness import write_task

    folder = tmp_path_factory.mktemp("lm-eval")
    data = folder / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    return write_task(folder / "tasks", data, name="tiny_mc")


def _loglikelihood(model, context: list[int], continuation: list[int]) -> float:
    """The reference: PEFT's (or the base model's) own forward."""
    ids = context + continuation
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return sum(lp[len(context) - 1 + i, t].item() for i, t in enumerate(continuation))


def test_lm_eval_local_completions_scores_a_prefix_as_peft_does(stack, tenant_key, adapters, tokenizer, task_folder,
                                                                 vocab):
    from eval_harness import evaluate

    with stack.client(tenant_key) as c:
        assert upload(c, "scored", adapters[2].zip_bytes).status_code == 201
    for model, reference in (("scored", adapters[2].peft_model), (MODEL_NAME, tiny_llama(0, vocab))):
        out = evaluate(stack.url, tenant_key, model, task_folder, name="tiny_mc", log_samples=True)
        samples = out["samples"]["tiny_mc"]
        assert len(samples) == len(ITEMS)
        for sample in samples:
            for (context, continuation), ((loglik, _),) in zip(sample["arguments"], sample["resps"]):
                # lm-eval's split: the whole text encoded, the context's tokens cut off
                whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
                ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
                assert abs(loglik - _loglikelihood(reference, ctx, whole[len(ctx):])) < 1e-3
        assert 0.0 <= out["results"]["tiny_mc"]["acc,none"] <= 1.0
