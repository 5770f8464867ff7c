"""Personalization defaults: from a job's examples to a training run that needs no tuning.

    forms      prompt/completion pairs are trained as text and, when the model has a chat
               template, as a chat turn too (data.py), so the persona works both ways
    split      HELD_OUT_FRACTION of the examples (whole examples, both forms) are held out
               when there are at least MIN_EXAMPLES_TO_HOLD_OUT; never more than MAX_HELD_OUT
    steps      EPOCHS passes over the training sequences, within [MIN_STEPS, MAX_STEPS]
               (or the job's own `steps`); warmup WARMUP_FRACTION of them; peak learning
               rate LEARNING_RATE (5e-3 throws SmolLM2's prefix off at the first AdamW step:
               the training loss goes 2.7 -> 13 and needs ~100 steps to come back, which
               early stopping rightly refuses; 1e-3 falls steadily, 2.7 -> 0.3 in 16 steps)
    stopping   the held-out loss every ~steps/EVALUATIONS steps; the best prefix is kept and
               training stops after PATIENCE evaluations without a better one
    knowledge  KL to the frozen base model (regularizer.py), weight KL_WEIGHT, at every
               position of the examples and of the neutral prompts but the completion
               tokens the base model gives less than KL_FREE_BELOW (the style: there the
               examples ask for a change). Measured on four personas (bench/
               personalization_quality.py and the same recipe in-process): weight 1 with
               the KL everywhere kept 71-90% of the base model's QA accuracy but left two
               personas' style at 45-70%; weight 30 with the style freed gave 78-100%
               style on the three personas that open with their style and kept 74-100% of
               the accuracy; a style at the end of the reply ("... Hope that helps!") is
               then learned only 20-30% of the time

The worker plans every job with `plan_job`; bench/personalization_quality.py measures
what these defaults give.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from server.engine.tokenization import ChatMessage, render_chat
from server.training.data import Example, TokenizedExample, has_chat_template, tokenize
from server.training.regularizer import NEUTRAL_PROMPTS, Anchor
from server.training.trainer import TrainConfig

HELD_OUT_FRACTION = 0.2
MIN_EXAMPLES_TO_HOLD_OUT = 4  # with fewer, every example is needed to learn from
MAX_HELD_OUT = 64
EPOCHS = 20
MIN_STEPS = 30
MAX_STEPS = 1000
WARMUP_FRACTION = 0.1
EVALUATIONS = 20  # held-out evaluations over a full run
PATIENCE = 4
KL_WEIGHT = 30.0
KL_FREE_BELOW = 0.3
LEARNING_RATE = 1e-3


@dataclass(frozen=True)
class Plan:
    config: TrainConfig
    train: list[TokenizedExample]  # what the steps train on
    held_out: list[TokenizedExample]  # early stopping (empty: too few examples to hold any out)
    anchors: list[Anchor]  # where the KL to the base model holds
    num_held_out_examples: int  # examples held out (each may give two sequences: text and chat)


def plan_job(tokenizer, examples: list[Example], *, max_length: int, steps: int | None = None,
             max_steps: int = MAX_STEPS,
             num_virtual_tokens: int = 10, learning_rate: float = LEARNING_RATE, batch_size: int = 8, mid_dim: int = 512,
             init_text: str | None = None, seed: int = 0, kl_weight: float | None = None,
             held_out_fraction: float | None = None) -> Plan:
    """The training run for a personalization job (see the module docstring). Raises
    ValueError naming an example that does not fit."""
    data = tokenize(tokenizer, examples, max_length, chat_too=True)
    held = held_out_sources(len(examples), HELD_OUT_FRACTION if held_out_fraction is None else held_out_fraction,
                            seed)
    train = [e for e in data if e.source not in held]
    held_out = [e for e in data if e.source in held]
    if steps is None:
        steps = min(max_steps, MAX_STEPS, max(MIN_STEPS, EPOCHS * math.ceil(len(train) / batch_size)))
    weight = KL_WEIGHT if kl_weight is None else kl_weight
    config = TrainConfig(num_virtual_tokens=num_virtual_tokens, steps=steps, learning_rate=learning_rate,
                         batch_size=min(batch_size, len(train)), mid_dim=mid_dim, init_text=init_text,
                         max_length=max_length, seed=seed, warmup_steps=int(steps * WARMUP_FRACTION),
                         eval_every=max(1, steps // EVALUATIONS), patience=PATIENCE if held_out else 0,
                         kl_weight=weight, kl_free_below=KL_FREE_BELOW)
    anchors = neutral_anchors(tokenizer) if weight > 0 else []
    return Plan(config=config, train=train, held_out=held_out, anchors=anchors, num_held_out_examples=len(held))


def held_out_sources(count: int, fraction: float, seed: int) -> set[int]:
    """Indices of the examples held out: a seeded random `fraction` of them, at least one once
    there are MIN_EXAMPLES_TO_HOLD_OUT, none below that."""
    if not 0 <= fraction < 1:
        raise ValueError(f"held_out_fraction must be in [0, 1), got {fraction}")
    if count < MIN_EXAMPLES_TO_HOLD_OUT or fraction == 0:
        return set()
    k = min(MAX_HELD_OUT, max(1, round(count * fraction)))
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return set(order[:k])


def neutral_anchors(tokenizer) -> list[Anchor]:
    """The neutral prompts as the regulariser's extra anchors: through the chat template (as
    a `messages` request is rendered), or as text for a model without one."""
    anchors = []
    for text in NEUTRAL_PROMPTS:
        if has_chat_template(tokenizer):
            ids = tuple(render_chat(tokenizer, [ChatMessage("user", text)]))
        else:
            ids = tuple(tokenizer(text)["input_ids"])
        if len(ids) > 1:
            anchors.append(Anchor(ids, 1))
    return anchors
