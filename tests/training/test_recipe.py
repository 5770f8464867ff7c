"""What a personalization job trains (issue 13): packed steps that equal padded ones, the
chat form rendered exactly as serving renders `messages`, a held-out split with early
stopping that keeps the best prefix, steps from the data, and the KL regulariser."""

from __future__ import annotations

import math

import pytest
import torch

from server.engine.tokenization import ChatMessage, encode_text, render_chat
from server.training import recipe
from server.training.data import Example, end_of_turn_id, tokenize
from server.training.packing import pack
from server.training.prefix_forward import forward_packed, forward_with_prefix, prefix_past
from server.training.recipe import plan_job
from server.training.regularizer import Anchor, base_targets, kl_to_base
from server.training.trainer import TrainConfig, evaluate_loss, train_prefix
from tests.training.conftest import MEMORY_EXAMPLES, make_byte_tokenizer, make_tiny_llama


def test_packed_rows_give_each_sequence_its_padded_logits():
    model, tok = make_tiny_llama(), make_byte_tokenizer()
    kv = prefix_past(model, None, tok("task: x\n", add_special_tokens=False)["input_ids"])
    # shared beginnings (one is a prefix of another), and a row limit that splits them
    sequences = [list(b"name: Ada says hi"), list(b"name: Ada says bye"), list(b"name: Bob"), list(b"name: Ada"),
                 list(b"other")]
    rows = pack(sequences, row_tokens=24)
    assert rows.input_ids.shape[0] > 1  # the limit made several rows
    assert rows.num_tokens < sum(len(s) for s in sequences)  # shared beginnings computed once
    flat = [i for index in rows.index for i in index]
    packed = forward_packed(model, kv, rows, torch.tensor(flat))
    offset = 0
    for seq in sequences:
        alone = forward_with_prefix(model, kv, torch.tensor([seq]))[0]
        torch.testing.assert_close(packed[offset:offset + len(seq)], alone, atol=1e-5, rtol=1e-4)
        offset += len(seq)


def test_a_pair_trains_as_text_and_as_the_chat_turn_serving_renders():
    tok = make_byte_tokenizer(chat_template=True)
    text, chat = tokenize(tok, [Example("Greet me.", " Hi Bob!")], max_length=200, chat_too=True)
    assert not text.chat and chat.chat and text.source == chat.source == 0
    assert list(text.prompt_ids) == encode_text(tok, "Greet me.")  # as a `prompt` request
    assert list(text.completion_ids) == tok(" Hi Bob!", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # as a `messages` request (and the OpenAI chat route) renders it, then the assistant's
    # words and the token that ends its turn
    assert list(chat.prompt_ids) == render_chat(tok, [ChatMessage("user", "Greet me.")])
    assert list(chat.completion_ids) == tok("Hi Bob!", add_special_tokens=False)["input_ids"] + [end_of_turn_id(tok)]
    # without a chat template a pair is trained as text only
    assert len(tokenize(make_byte_tokenizer(), [Example("Greet me.", " Hi Bob!")], 200, chat_too=True)) == 1


def test_every_assistant_turn_of_a_chat_is_trained_after_its_history():
    tok = make_byte_tokenizer(chat_template=True)
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Yo."}, {"role": "user", "content": "Bye"},
             {"role": "assistant", "content": "Later."}]
    first, second = tokenize(tok, [Example.chat(turns)], max_length=400)
    history = [ChatMessage(m["role"], m["content"]) for m in turns]
    assert list(first.prompt_ids) == render_chat(tok, history[:2])
    assert list(second.prompt_ids) == render_chat(tok, history[:4])
    assert tok.decode(second.completion_ids[:-1]) == "Later."
    with pytest.raises(ValueError, match="needs an assistant message"):
        Example.chat([{"role": "user", "content": "Hi"}])
    with pytest.raises(ValueError, match="chat template"):
        tokenize(make_byte_tokenizer(), [Example.chat(turns)], max_length=400)


def test_the_plan_holds_out_whole_examples_and_derives_steps_from_the_data():
    tok = make_byte_tokenizer(chat_template=True)
    examples = [Example(f"question {i}?", f" answer {i}.") for i in range(10)]
    plan = plan_job(tok, examples, max_length=200, batch_size=4)
    held = {e.source for e in plan.held_out}
    assert plan.num_held_out_examples == len(held) == 2  # 20% of 10
    assert not held & {e.source for e in plan.train}  # both forms of an example stay on one side
    assert len(plan.train) == 2 * 8 and len(plan.held_out) == 2 * 2  # text + chat each
    assert plan.config.steps == max(recipe.MIN_STEPS, recipe.EPOCHS * math.ceil(16 / 4))
    assert plan.config.patience == recipe.PATIENCE and plan.config.kl_weight == recipe.KL_WEIGHT
    assert plan.anchors  # the neutral prompts
    # few examples: nothing held out, no early stopping; the job's own steps win
    small = plan_job(tok, examples[:3], max_length=200, steps=7)
    assert small.held_out == [] and small.config.patience == 0 and small.config.steps == 7
    assert plan_job(tok, examples, max_length=200, max_steps=35).config.steps == 35  # the server's limit


def test_early_stopping_returns_the_prefix_with_the_lowest_held_out_loss():
    model, tok = make_tiny_llama(), make_byte_tokenizer()
    data = tokenize(tok, [Example(p, c) for p, c in MEMORY_EXAMPLES + [("name: Cy\nsays:", " see you")]], 64)
    train, held_out = data[:2], data[2:]  # the held-out answer cannot be learned from the others
    config = TrainConfig(num_virtual_tokens=4, steps=60, learning_rate=2e-2, batch_size=2, mid_dim=32,
                         eval_every=5, patience=2)
    seen = []
    result = train_prefix(model, train, config, held_out=held_out, on_eval=lambda step, loss: seen.append(step))
    steps, losses = zip(*result.held_out)
    assert steps[0] == 0 and list(steps[1:]) == seen
    assert result.best_step == steps[losses.index(min(losses))]
    assert evaluate_loss(model, result.kv, held_out) == pytest.approx(result.best_held_out_loss, rel=1e-4)
    assert result.base_held_out_loss == pytest.approx(evaluate_loss(model, None, held_out), rel=1e-6)
    if result.stopped_early:  # it stopped `patience` evaluations after the best
        assert result.steps_done == result.best_step + config.patience * config.eval_every < config.steps


def test_the_kl_term_keeps_the_model_closer_to_the_base_on_unseen_prompts():
    model, tok = make_tiny_llama(), make_byte_tokenizer()
    data = tokenize(tok, [Example(p, c) for p, c in MEMORY_EXAMPLES], 64)
    neutral = [Anchor(tuple(tok(t)["input_ids"]), 1) for t in ("how do plants grow?", "write a poem", "tell me x")]
    unseen = [Anchor(tuple(tok(t)["input_ids"]), 1) for t in ("what is the sea?", "how are you?")]
    base = base_targets(model, None, unseen)

    def kl_on_unseen(kl_weight: float) -> float:
        config = TrainConfig(num_virtual_tokens=4, steps=40, learning_rate=2e-2, batch_size=2, mid_dim=32,
                             kl_weight=kl_weight)
        kv = train_prefix(model, data, config, anchors=neutral).kv
        rows = pack([a.token_ids for a in unseen])
        outputs = [i for a, index in zip(unseen, rows.index) for i in index[a.first - 1:len(a.token_ids) - 1]]
        with torch.no_grad():
            logits = forward_packed(model, kv, rows, torch.tensor(outputs))
        return float(kl_to_base(logits, torch.cat(base.log_probs), torch.cat(base.token_ids)))

    free, held = kl_on_unseen(0.0), kl_on_unseen(5.0)
    assert held < 0.5 * free, (held, free)


def test_the_kl_holds_everywhere_but_at_learned_tokens_the_base_model_finds_unlikely():
    model, tok = make_tiny_llama(), make_byte_tokenizer()
    prompt, completion = tok("name: Ada\nsays:")["input_ids"], tok(" hi to you all")["input_ids"]
    example = Anchor(tuple(prompt + completion), 1, learned_from=len(prompt))
    neutral = Anchor(tuple(tok("write a poem")["input_ids"]), 1)
    everywhere = base_targets(model, None, [example, neutral])
    freed = base_targets(model, None, [example, neutral], free_below=0.5)
    assert all(bool(h.all()) for h in everywhere.held)
    assert bool(freed.held[1].all())  # no learned tokens: held everywhere
    # the base model's probability of each next token of the example
    rows = pack([example.token_ids])
    with torch.no_grad():
        logits = forward_packed(model, None, rows, torch.tensor(rows.index[0][:-1]))
    p_next = torch.softmax(logits.float(), -1).gather(1, torch.tensor(example.token_ids[1:])[:, None])[:, 0]
    learned = torch.arange(1, len(example.token_ids)) >= len(prompt)
    assert torch.equal(freed.held[0], ~(learned & (p_next < 0.5)))
    assert not bool(freed.held[0].all()) and bool(freed.held[0][:len(prompt) - 1].all())  # prompts always held
    # the KL is the mean over the held positions only
    kl_all = kl_to_base(logits * 0.5, everywhere.log_probs[0], everywhere.token_ids[0])
    kl_held = kl_to_base(logits * 0.5, freed.log_probs[0], freed.token_ids[0], freed.held[0])
    log_p = torch.log_softmax(logits.float() * 0.5, -1).gather(1, freed.token_ids[0])
    per_position = (freed.log_probs[0].exp() * (freed.log_probs[0] - log_p)).sum(1)
    assert float(kl_all) == pytest.approx(float(per_position.mean()), rel=1e-5)
    assert float(kl_held) == pytest.approx(float(per_position[freed.held[0]].mean()), rel=1e-5)
