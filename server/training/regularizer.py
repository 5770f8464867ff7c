"""Keeping the base model's knowledge: a KL term to the frozen base model.

A prefix trained on a handful of examples only by their likelihood learns whatever lowers
it fastest, the answers included: asked something new, it answers with a memorised fact
in the right style. The regulariser keeps the prefixed model's next-token distribution
close to the base model's (the frozen model after the task prefix, if any, without the
user's prefix) where the examples do not ask for a change:

    loss = CE(examples' completions) + kl_weight * mean KL(p_base || p_prefixed) over anchor positions

An anchor is a token sequence and the positions whose predictions are held to the base:
- the examples' own completions, teacher forced: what the persona's answers share with
  the base model's (the facts, the grammar) is held to the base. Where a completion token
  is one the base model finds unlikely (probability below `free_below`), the example asks
  for a change (the style): the KL is off at that position, so a strong KL elsewhere does
  not fight the cross-entropy there. The prefix learns the difference, not the answers;
- the examples' prompts and neutral prompts (NEUTRAL_PROMPTS), through the chat template:
  how the model reads a question, where it recalls what it knows, stays the base
  model's.

The base model's distributions are fixed (its weights and the task prefix are frozen), so
they are computed once per job, before the first step, and kept as their top TOP_K
tokens renormalised (a [positions, TOP_K] table): the regulariser then costs no extra
forward, only the anchor tokens in the packed step (anchors that repeat an example's
tokens cost nothing: packing computes them once).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.training.packing import pack
from server.training.prefix_forward import forward_packed

TOP_K = 32  # base tokens kept per position; the rest of the base's mass is dropped (renormalised)

# General requests unlike any persona's examples, read through the chat template. They are
# anchors for how the model reads, not answers to learn (the bench's QA set is not here).
NEUTRAL_PROMPTS = (
    "Write a short poem about the sea.",
    "Give me three tips for sleeping better.",
    "Explain what a computer program is.",
    "How do plants make their food?",
    "What should I pack for a weekend trip?",
    "Describe a sunset in two sentences.",
    "Why do we need to drink water?",
    "Tell me a fun fact about space.",
    "How can I improve my handwriting?",
    "What is a good way to start learning to cook?",
    "Summarize the story of Cinderella.",
    "What are the benefits of regular exercise?",
    "How does a bicycle work?",
    "Suggest a name for a friendly robot.",
    "What is the difference between weather and climate?",
    "Write one sentence about friendship.",
)


@dataclass(frozen=True)
class Anchor:
    token_ids: tuple[int, ...]
    first: int  # the predictions of token_ids[first:] are held to the base model (1 <= first < len)
    learned_from: int | None = None  # token_ids[learned_from:] are learned (an example's completion)

    def __post_init__(self) -> None:
        if not 1 <= self.first < len(self.token_ids):
            raise ValueError(f"anchor of {len(self.token_ids)} tokens cannot start at {self.first}")

    @property
    def num_positions(self) -> int:
        return len(self.token_ids) - self.first


@dataclass(frozen=True)
class BaseTargets:
    """The base model's top-K next-token distribution at every anchor position."""

    anchors: tuple[Anchor, ...]
    log_probs: tuple[torch.Tensor, ...]  # per anchor [num_positions, TOP_K] float32, log of renormalised probs
    token_ids: tuple[torch.Tensor, ...]  # per anchor [num_positions, TOP_K] long
    held: tuple[torch.Tensor, ...]  # per anchor [num_positions] bool: the KL holds there


def outputs_of(index: list[int], anchor: Anchor) -> list[int]:
    """Flat indices (in a packed batch) of the tokens whose outputs predict token_ids[first:]."""
    return index[anchor.first - 1:len(anchor.token_ids) - 1]


@torch.no_grad()
def base_targets(model: torch.nn.Module, task_kv: torch.Tensor | None, anchors: list[Anchor],
                 row_tokens: int = 512, chunk: int = 16, free_below: float = 0.0) -> BaseTargets:
    """The frozen model's (after task_kv) top-K distributions at the anchors' positions, and
    where the KL holds: everywhere, but at a learned token the base model gives a
    probability below `free_below` (there the examples ask for a change: the style)."""
    log_probs, token_ids, held = [], [], []
    for start in range(0, len(anchors), chunk):
        part = anchors[start:start + chunk]
        rows = pack([a.token_ids for a in part], row_tokens)
        outputs = [i for a, index in zip(part, rows.index) for i in outputs_of(index, a)]
        logits = forward_packed(model, task_kv, rows, torch.tensor(outputs)).float()
        top = logits.topk(TOP_K, dim=-1)
        lp = torch.log_softmax(top.values, dim=-1).cpu()
        ids = top.indices.cpu()
        next_ids = torch.tensor([t for a in part for t in a.token_ids[a.first:]], device=logits.device)
        p_next = (logits.gather(1, next_ids[:, None])[:, 0] - logits.logsumexp(dim=-1)).exp().cpu()
        offset = 0
        for a in part:
            log_probs.append(lp[offset:offset + a.num_positions])
            token_ids.append(ids[offset:offset + a.num_positions])
            learned = torch.arange(a.first, len(a.token_ids)) >= (len(a.token_ids) if a.learned_from is None
                                                                 else a.learned_from)
            held.append(~(learned & (p_next[offset:offset + a.num_positions] < free_below)))
            offset += a.num_positions
    return BaseTargets(tuple(anchors), tuple(log_probs), tuple(token_ids), tuple(held))


def kl_to_base(logits: torch.Tensor, base_log_probs: torch.Tensor, base_ids: torch.Tensor,
               held: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the held positions of KL(p_base || p) on the base's top-K tokens.

    logits [N, V] (the prefixed model), base_log_probs and base_ids [N, TOP_K], held [N] bool
    (None: all)."""
    log_p = torch.log_softmax(logits.float(), dim=-1).gather(1, base_ids.to(logits.device))
    base = base_log_probs.to(logits.device)
    kl = (base.exp() * (base - log_p)).sum(dim=1)
    if held is None:
        return kl.mean()
    held = held.to(logits.device)
    return (kl * held).sum() / held.sum().clamp(min=1)
