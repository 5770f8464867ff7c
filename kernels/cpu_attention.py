"""Prefix attention on the CPU: the semantics of kernels/torch_attention.py, split by work.

- Requests with at most DECODE_MAX_Q new tokens (decodes, short chunks) go to the C++
  kernel (kernels/csrc/cpu_ops.cpp), which reads keys and values in place from the paged
  pool: no gather, one pass over each request's context.
- The other requests (prefill chunks) are gathered once per layer into a padded batch and
  run as one `scaled_dot_product_attention` with a mask, which uses torch's CPU flash
  attention: matmuls on the matrix units, where a long prompt's work is.

The plan for the second part (gather rows, query rows, the mask) is built once per step,
with array ops, and shared by every layer through `meta.plan`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import cpu_ops
from kernels.attention_metadata import AttentionMetadata
from kernels.torch_attention import gather_rows

DECODE_MAX_Q = 8  # new tokens of a request that the C++ kernel takes; longer chunks go to SDPA


@dataclass
class PrefillPlan:
    gather: torch.Tensor  # [R * L] pool rows of each request's context (padding reads row 0)
    token_index: torch.Tensor  # [R * Q] query row of each padded position (padding repeats a real row)
    real_rows: torch.Tensor  # [N] positions in the padded [R * Q] that are real tokens
    real_tokens: torch.Tensor  # [N] their rows in the packed batch
    mask: torch.Tensor  # [R, 1, Q, L] bool, True = attend
    num_requests: int  # R
    q_max: int  # Q
    ctx_max: int  # L


def build_prefill_plan(meta: AttentionMetadata) -> PrefillPlan | None:
    """The padded batch of the requests with more than DECODE_MAX_Q new tokens; None if none."""
    q_lens = meta.cu_seqlens_q[1:] - meta.cu_seqlens_q[:-1]  # [B]
    chosen = torch.nonzero(q_lens > DECODE_MAX_Q).flatten()
    if chosen.numel() == 0:
        return None
    bs = meta.block_size
    q = q_lens[chosen].long()  # [R]
    prefix = meta.prefix_lens[chosen].long()
    own = meta.seq_lens[chosen].long()
    start = meta.cu_seqlens_q[:-1][chosen].long()
    r, q_max, ctx_max = chosen.numel(), int(q.max()), int((prefix + own).max())
    # context slot k of request r: prefix slots, then own slots, then padding (row 0)
    k = torch.arange(ctx_max)[None, :]  # [1, L]
    in_prefix = k < prefix[:, None]
    own_pos = (k - prefix[:, None]).clamp(min=0)
    pb = meta.prefix_block_tables[chosen].long()
    ob = meta.block_tables[chosen].long()
    prefix_slot = pb.gather(1, (k // bs).clamp(max=pb.shape[1] - 1).expand(r, -1)) * bs + k % bs
    own_slot = ob.gather(1, (own_pos // bs).clamp(max=ob.shape[1] - 1)) * bs + own_pos % bs
    valid = k < (prefix + own)[:, None]
    gather = torch.where(in_prefix, prefix_slot, own_slot).masked_fill(~valid, 0)  # [R, L]
    j = torch.arange(q_max)[None, :]  # [1, Q]
    real = j < q[:, None]  # [R, Q]
    token_index = start[:, None] + torch.minimum(j, q[:, None] - 1)  # padding repeats the last real row
    visible = prefix + own - q  # [R]: keys every new token sees, before its own causal part
    mask = k[:, None, :] <= (visible[:, None] + j)[:, :, None]  # [R, Q, L]: prefix, own up to j
    mask = (mask & valid[:, None, :]) | (~real)[:, :, None] & (k == 0)[:, None, :]  # padding rows see row 0
    real_rows = torch.nonzero(real.flatten()).flatten()
    return PrefillPlan(gather=gather.flatten(), token_index=token_index.flatten(), real_rows=real_rows,
                       real_tokens=token_index.flatten().index_select(0, real_rows), mask=mask[:, None],
                       num_requests=r, q_max=q_max, ctx_max=ctx_max)


def prefix_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                     scale: float) -> torch.Tensor:
    """q: [T, H, hd]; caches: [num_blocks, block_size, Hkv, hd] -> out [T, H, hd].

    The caches must already hold this step's keys and values (see kernels.write_kv).
    """
    out = torch.empty_like(q)
    cpu_ops.paged_attention(q, k_cache, v_cache, meta, scale, DECODE_MAX_Q, out)
    if "cpu_prefill" not in meta.plan:
        meta.plan["cpu_prefill"] = build_prefill_plan(meta)
    plan: PrefillPlan | None = meta.plan["cpu_prefill"]
    if plan is None:
        return out
    r, qn, ln = plan.num_requests, plan.q_max, plan.ctx_max
    num_heads, head_dim, num_kv_heads = q.shape[1], q.shape[2], k_cache.shape[2]
    kg = gather_rows(k_cache, plan.gather).view(r, ln, num_kv_heads, head_dim).transpose(1, 2)  # [R, Hkv, L, hd]
    vg = gather_rows(v_cache, plan.gather).view(r, ln, num_kv_heads, head_dim).transpose(1, 2)
    qg = q.index_select(0, plan.token_index).view(r, qn, num_heads, head_dim).transpose(1, 2)  # [R, H, Q, hd]
    og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=plan.mask, scale=scale,
                                        enable_gqa=num_heads != num_kv_heads)  # [R, H, Q, hd]
    rows = og.transpose(1, 2).reshape(r * qn, num_heads, head_dim).index_select(0, plan.real_rows)
    out.index_copy_(0, plan.real_tokens, rows)
    return out
