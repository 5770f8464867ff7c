"""Next-token choice for a whole batch: greedy, or temperature / top-k / top-p with a seed.

    greedy rows:  the first index of each row's maximum, on the logits in their own dtype
    other rows:   scores = logits / temperature, top-k and top-p cuts to -inf, then
                  token = argmax(scores + Gumbel noise)   (a draw from softmax(scores))

The sampled rows are done together (one masked argmax for all of them). A seeded request
draws its n-th token's noise from a generator seeded by (seed, n), so the same seed gives
the same tokens whatever else shares the batch, and a request that was preempted and
recomputed draws exactly what it would have drawn.
"""

from __future__ import annotations

import torch

from kernels import layer_ops
from server.engine.sampling_params import SamplingParams

_SEED_STRIDE = 1_000_003
_TINY = 1e-20  # keeps log(-log(u)) finite at u = 0


def token_seed(seed: int, index: int) -> int:
    """The generator seed of output token `index` of a request seeded with `seed`: stays in
    [0, 2^63) for every seed SamplingParams accepts (a plain product would overflow)."""
    return (seed * _SEED_STRIDE + index) % (2**63)


def sample(logits: torch.Tensor, params: list[SamplingParams], output_index: list[int]) -> list[int]:
    """logits: [N, V] (any float dtype); output_index[i]: how many tokens request i has produced."""
    if logits.shape[0] == 0:
        return []
    tokens = layer_ops(logits.device).argmax_rows(logits.contiguous())  # [N]
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        chosen = _sample_rows(logits[rows].float(), [params[i] for i in rows], [output_index[i] for i in rows])
        tokens[rows] = chosen
    return tokens.tolist()


def _sample_rows(scores: torch.Tensor, params: list[SamplingParams], index: list[int]) -> torch.Tensor:
    """scores: [S, V] float32 logits of the rows that sample -> [S] tokens."""
    s, vocab = scores.shape
    scores = scores / torch.tensor([p.temperature for p in params], device=scores.device)[:, None]
    ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(ks):
        k = torch.tensor(ks, device=scores.device)
        kth = torch.topk(scores, max(ks), dim=-1).values.gather(1, (k - 1).clamp(min=0)[:, None])  # [S, 1]
        scores = scores.masked_fill((scores < kth) & (k > 0)[:, None], float("-inf"))
    tops = torch.tensor([p.top_p for p in params], device=scores.device)
    if bool((tops < 1.0).any()):
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        # Keep a token while the mass before it is below top_p; the first is always kept.
        drop = (probs.cumsum(dim=-1) - probs) >= tops[:, None]
        drop[:, 0] = False
        scores = scores.scatter(1, order, sorted_scores.masked_fill(drop, float("-inf")))
    u = torch.empty_like(scores)
    for row, (p, i) in enumerate(zip(params, index)):
        gen = torch.Generator(device=scores.device)
        if p.seed is not None:
            gen.manual_seed(token_seed(p.seed, i))
        else:
            gen.seed()
        u[row].uniform_(generator=gen)
    gumbel = -torch.log(-torch.log(u.clamp_(_TINY, 1.0 - 1e-7)))
    return (scores + gumbel).argmax(dim=-1)
