"""Log-probabilities of chosen tokens, with the most likely tokens beside them.

Always float32 `log_softmax` of the raw logits (the model's distribution, before
temperature, top-k or top-p), so they equal PEFT's `log_softmax` of its logits.
"""

from __future__ import annotations

import torch

from server.engine.outputs import TokenLogprob

ROWS_AT_ONCE = 256  # rows upcast at a time: a 1024-row prompt chunk never needs [1024, V] float32


def token_logprobs(logits: torch.Tensor, token_ids: list[int], top: list[int]) -> list[TokenLogprob]:
    """logits [R, V]: row r's logprob of token_ids[r], and its top[r] most likely tokens."""
    out: list[TokenLogprob] = []
    for start in range(0, logits.shape[0], ROWS_AT_ONCE):
        rows = torch.log_softmax(logits[start:start + ROWS_AT_ONCE].float(), dim=-1)
        ids = token_ids[start:start + ROWS_AT_ONCE]
        chosen = rows.gather(1, torch.tensor(ids, device=rows.device)[:, None])[:, 0].tolist()
        k = max(top[start:start + ROWS_AT_ONCE], default=0)
        if k:
            best_lp, best_id = (t.tolist() for t in torch.topk(rows, k, dim=-1))
        for r, (token, lp) in enumerate(zip(ids, chosen)):
            n = top[start + r]
            pairs = tuple(zip(best_id[r][:n], best_lp[r][:n])) if n else ()
            out.append(TokenLogprob(token, lp, pairs))
    return out
