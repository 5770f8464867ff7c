"""Next-token choice for a whole batch: greedy, or temperature / top-k / top-p with a seed.

    greedy rows:  the first index of each row's maximum, on the logits in their own dtype
    other rows:   scores = logits / temperature, top-k and top-p cuts to -inf, then
                  token = argmax(scores + Gumbel noise)   (a draw from softmax(scores))

The sampled rows are done together (one masked argmax for all of them). A seeded request
draws its n-th token's noise from a generator seeded by (seed, n, sample), so the same seed
gives the same tokens whatever else shares the batch, a request that was preempted and
recomputed draws exactly what it would have drawn, and the n samples of one request draw
apart.
"""

from __future__ import annotations

import torch

from kernels import layer_ops
from server.engine.sampling_params import SamplingParams

_SEED_STRIDE = 1_000_003
_SAMPLE_STRIDE = 0x9E3779B97F4A7C15  # the golden-ratio constant: samples' seeds far apart
_TINY = 1e-20  # keeps log(-log(u)) finite at u = 0


def token_seed(seed: int, index: int, sample: int = 0) -> int:
    """The generator seed of output token `index` of sample `sample` of a request seeded
    with `seed`: stays in [0, 2^63) for every seed SamplingParams accepts (a plain product
    would overflow)."""
    return (seed * _SEED_STRIDE + index + sample * _SAMPLE_STRIDE) % (2**63)


def sample(logits: torch.Tensor, params: list[SamplingParams], output_index: list[int],
           sample_index: list[int] | None = None) -> list[int]:
    """logits: [N, V] (any float dtype); output_index[i]: how many tokens request i has
    produced; sample_index[i]: which of its request's n samples row i is (default 0)."""
    if logits.shape[0] == 0:
        return []
    tokens = layer_ops(logits.device).argmax_rows(logits.contiguous())  # [N]
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        samples = sample_index or [0] * len(params)
        chosen = _sample_rows(logits[rows].float(), [params[i] for i in rows], [output_index[i] for i in rows],
                              [samples[i] for i in rows])
        tokens[rows] = chosen
    return tokens.tolist()


def _sample_rows(scores: torch.Tensor, params: list[SamplingParams], index: list[int],
                 samples: list[int]) -> torch.Tensor:
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
    for row, (p, i, j) in enumerate(zip(params, index, samples)):
        gen = torch.Generator(device=scores.device)
        if p.seed is not None:
            gen.manual_seed(token_seed(p.seed, i, j))
        else:
            gen.seed()
        u[row].uniform_(generator=gen)
    gumbel = -torch.log(-torch.log(u.clamp_(_TINY, 1.0 - 1e-7)))
    return (scores + gumbel).argmax(dim=-1)
