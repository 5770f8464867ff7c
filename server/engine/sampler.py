"""Next-token choice per request: greedy, or temperature / top-k / top-p with a seed.

Seeded sampling draws the n-th output token from a generator seeded by (seed, n), so the
same seed gives the same tokens whatever else shares the batch, and a request that was
preempted and recomputed draws exactly what it would have drawn.
"""

from __future__ import annotations

import torch

from server.engine.sampling_params import SamplingParams

_SEED_STRIDE = 1_000_003


def token_seed(seed: int, index: int) -> int:
    """The generator seed of output token `index` of a request seeded with `seed`: stays in
    [0, 2^63) for every seed SamplingParams accepts (a plain product would overflow)."""
    return (seed * _SEED_STRIDE + index) % (2**63)


def sample(logits: torch.Tensor, params: list[SamplingParams], output_index: list[int]) -> list[int]:
    """logits: [N, V] float32; output_index[i]: how many tokens request i has produced."""
    if logits.shape[0] == 0:
        return []
    tokens = logits.argmax(dim=-1).tolist()  # greedy for every row, overwritten below
    for i, p in enumerate(params):
        if not p.greedy:
            tokens[i] = _sample_row(logits[i], p, output_index[i])
    return tokens


def _sample_row(logits: torch.Tensor, p: SamplingParams, index: int) -> int:
    scores = logits / p.temperature  # [V]
    if p.top_k > 0 and p.top_k < scores.shape[0]:
        kth = torch.topk(scores, p.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        # Keep a token while the mass before it is below top_p (the first is always kept).
        drop = probs.cumsum(dim=-1) - probs >= p.top_p
        drop[0] = False  # also when top_p rounds to 0 in float32
        scores = scores.index_put((order[drop],), torch.tensor(float("-inf")))
    probs = scores.softmax(dim=-1)
    gen = torch.Generator(device=logits.device)
    if p.seed is not None:
        gen.manual_seed(token_seed(p.seed, index))
    else:
        gen.seed()
    return int(torch.multinomial(probs, 1, generator=gen).item())
