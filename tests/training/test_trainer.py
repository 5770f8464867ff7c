"""The prefix trainer on a tiny GQA Llama: it learns, starts at real words, stops on cancel."""

from __future__ import annotations

import pytest
import torch

from server.training.data import Example, tokenize
from server.prefix import ModelSpec
from server.training.prefix_forward import forward_with_prefix, prefix_past
from tests.factories import greedy_generate
from server.training.trainer import TrainConfig, train_prefix
from tests.training.conftest import MEMORY_EXAMPLES, make_byte_tokenizer, make_tiny_llama

EXAMPLES = [Example(p, c) for p, c in MEMORY_EXAMPLES]
MEMORIZE = TrainConfig(num_virtual_tokens=8, steps=150, learning_rate=2e-2, batch_size=2, mid_dim=64, seed=0)


@pytest.fixture(scope="module")
def trained():
    tok = make_byte_tokenizer()
    model = make_tiny_llama()
    data = tokenize(tok, EXAMPLES, max_length=64)
    return model, tok, data, train_prefix(model, data, MEMORIZE, tokenizer=tok)


def test_loss_falls_and_greedy_reproduces_the_trained_completions(trained):
    model, tok, data, result = trained
    assert result.steps_done == MEMORIZE.steps and not result.cancelled
    assert result.losses[0] > 5.0  # random model over a 257-token vocabulary
    assert max(result.losses[-5:]) < 0.2 * result.losses[0]
    for example in data:
        out = greedy_generate(model, result.kv, list(example.prompt_ids), max_tokens=20,
                              eos_token_id=tok.eos_token_id)
        assert out == list(example.completion_ids)  # the text, then EOS
    # The base model alone does not produce them: the prefix is what learned.
    bare = greedy_generate(model, None, list(data[0].prompt_ids), 20, tok.eos_token_id)
    assert bare != list(data[0].completion_ids)


def test_result_is_final_kv_in_serving_layout(trained):
    model, _, _, result = trained
    spec = ModelSpec.from_hf(model)
    assert result.kv.shape == spec.kv_shape(MEMORIZE.num_virtual_tokens) == (2, 2, 2, 8, 16)
    assert result.kv.dtype == torch.float32 and not result.kv.requires_grad
    assert all(not p.requires_grad for p in model.parameters())  # base stayed frozen


def test_init_from_real_words_equals_the_models_own_past_key_values(tokenizer):
    model = make_tiny_llama()
    text = "table-to-text:"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 14
    config = TrainConfig(num_virtual_tokens=14, steps=1, mid_dim=64, init_text=text)
    result = train_prefix(model, tokenize(tokenizer, EXAMPLES, 64), config, tokenizer=tokenizer)
    # The oracle: a plain HF forward over the words, no prefix code involved.
    with torch.no_grad():
        past = model(torch.tensor([ids]), use_cache=True).past_key_values
    expected = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in past.layers])
    torch.testing.assert_close(result.init_kv, expected, atol=1e-5, rtol=1e-5)
    # Served as a prefix, those words act exactly like the same words in the prompt.
    prompt = tokenizer(" name: Ada", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        with_prefix = forward_with_prefix(model, result.init_kv, torch.tensor([prompt]))[0]
        in_prompt = model(torch.tensor([ids + prompt])).logits[0, len(ids):]
    torch.testing.assert_close(with_prefix, in_prompt, atol=1e-4, rtol=1e-4)


def test_short_init_text_is_repeated_to_the_prefix_length(tokenizer):
    model = make_tiny_llama()
    config = TrainConfig(num_virtual_tokens=6, steps=1, mid_dim=64, init_text="ab")
    result = train_prefix(model, tokenize(tokenizer, EXAMPLES, 64), config, tokenizer=tokenizer)
    ids = tokenizer("ababab", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(result.init_kv, prefix_past(model, None, ids), atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_layer_of_the_prefix_kv():
    model = make_tiny_llama()
    kv = torch.randn(ModelSpec.from_hf(model).kv_shape(4), requires_grad=True)
    logits = forward_with_prefix(model, kv, torch.tensor([[5, 6, 7], [8, 9, 0]]),
                                 torch.tensor([[1, 1, 1], [1, 1, 0]]))
    logits[:, -1].sum().backward()
    per_layer_and_kind = kv.grad.abs().sum(dim=(2, 3, 4))  # [L, 2]
    assert (per_layer_and_kind > 0).all()


def test_training_on_top_of_a_task_prefix_serves_as_task_then_user(task_then_user):
    model, tokenizer, data, task_kv, result = task_then_user
    assert task_kv.shape[3] == 12 and result.kv.shape[3] == 8  # the result is the user part only
    # The user prefix starts at the words read *after* the task prefix.
    first = list(data[0].prompt_ids + data[0].completion_ids)[:8]
    torch.testing.assert_close(result.init_kv, prefix_past(model, task_kv, first), atol=1e-5, rtol=1e-5)
    composed = torch.cat([task_kv, result.kv], dim=3)
    for example in data:
        out = greedy_generate(model, composed, list(example.prompt_ids), 20, tokenizer.eos_token_id)
        assert out == list(example.completion_ids)
    # The user prefix was trained behind the task prefix: alone it is something else.
    ids = torch.tensor([data[0].prompt_ids + data[0].completion_ids])
    with torch.no_grad():
        alone = forward_with_prefix(model, result.kv, ids)
        served = forward_with_prefix(model, composed, ids)
    assert (alone - served).abs().max() > 1e-2


def test_progress_callback_reports_every_step_and_cancels(tokenizer):
    model = make_tiny_llama()
    data = tokenize(tokenizer, EXAMPLES, 64)
    seen = []

    def progress(step: int, total: int, loss: float) -> bool:
        seen.append((step, total, loss))
        return step < 3

    config = TrainConfig(num_virtual_tokens=4, steps=50, mid_dim=32)
    result = train_prefix(model, data, config, tokenizer=tokenizer, progress=progress)
    assert [s[:2] for s in seen] == [(1, 50), (2, 50), (3, 50)]
    assert result.cancelled and result.steps_done == 3 and len(result.losses) == 3
    assert [s[2] for s in seen] == result.losses


def test_same_seed_same_prefix_other_seed_other_prefix(tokenizer):
    model = make_tiny_llama()
    data = tokenize(tokenizer, EXAMPLES * 2, 64)
    config = TrainConfig(num_virtual_tokens=4, steps=6, batch_size=2, mid_dim=32, seed=3)
    a = train_prefix(model, data, config, tokenizer=tokenizer)
    b = train_prefix(model, data, config, tokenizer=tokenizer)
    c = train_prefix(model, data, TrainConfig(**{**config.__dict__, "seed": 4}), tokenizer=tokenizer)
    assert torch.equal(a.kv, b.kv) and a.losses == b.losses
    assert not torch.equal(a.kv, c.kv)


@pytest.mark.parametrize("field, value, words", [
    ("num_virtual_tokens", 0, "num_virtual_tokens must be an integer >= 1, got 0"),
    ("steps", -5, "steps must be an integer >= 1, got -5"),
    ("batch_size", 0, "batch_size must be an integer >= 1, got 0"),
    ("learning_rate", 0.0, "learning_rate must be in (0, 1], got 0.0"),
    ("learning_rate", float("nan"), "got nan"),
    ("weight_decay", -0.1, "weight_decay must be in [0, 1), got -0.1"),
    ("max_length", 1, "max_length must be an integer >= 2, got 1"),
    ("num_virtual_tokens", 600, "num_virtual_tokens (600) must be <= mid_dim (512)"),
    ("warmup_steps", 100, "warmup_steps (100) must be < steps (100)"),
    ("init_text", "  ", "init_text must not be empty"),
])
def test_bad_config_values_raise_with_the_numbers(field, value, words):
    with pytest.raises(ValueError) as e:
        TrainConfig(**{field: value})
    assert words in str(e.value)


def test_examples_that_do_not_fit_the_context_are_refused(tokenizer):
    model = make_tiny_llama()  # 256 positions
    data = tokenize(tokenizer, [Example("x" * 100, "y" * 100)], 300)
    with pytest.raises(ValueError, match=r"num_virtual_tokens \(60\) \+ longest example \(201\) exceeds the "
                                         r"model's context \(256\)"):
        train_prefix(model, data, TrainConfig(num_virtual_tokens=60, max_length=300, mid_dim=64))
