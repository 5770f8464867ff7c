"""Prefix attention on the CPU: the semantics of kernels/torch_attention.py, split by work.

- Requests with at most DECODE_MAX_Q new tokens (decodes, short chunks) go to the C++
  kernel (kernels/csrc/cpu_ops.cpp), which reads keys and values in place from the paged
  pool: no gather, one pass over each request's context.
- The other requests (prefill chunks) run on torch's CPU flash attention (matmuls on the
  matrix units, where a long prompt's work is), in two parts merged by their log-sum-exp:
  - a prefix of at least DENSE_PREFIX_MIN slots is attended to once per distinct prefix:
    the new tokens of every chunk that reads it are stacked into one unmasked attention
    (a long system prompt shared by many requests is gathered once, not once per request);
  - the rest of each chunk's context (its own tokens, and a shorter prefix) is gathered
    into one padded batch with a causal mask.

The plan for the second part (gather rows, query rows, the mask, the shared prefixes) is
built once per step, with array ops, and shared by every layer through `meta.plan`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import cpu_ops
from kernels.attention_metadata import AttentionMetadata
from kernels.torch_attention import gather_rows

DECODE_MAX_Q = 8  # new tokens of a request that the C++ kernel takes; longer chunks go to SDPA
# A prefill chunk's prefix at least this long is attended to apart, once per distinct prefix
# (one attention call per prefix and layer: shorter ones are cheaper inside the padded batch).
DENSE_PREFIX_MIN = 128

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # (out, logsumexp)


@dataclass
class SharedPrefix:
    """A long prefix read by this step's prefill chunks: its pool rows and their new tokens."""

    blocks: torch.Tensor  # [ceil(P / block_size)] its blocks
    length: int  # P
    tokens: torch.Tensor  # [n] rows in the packed batch of every new token that reads it


@dataclass
class PrefillPlan:
    gather: torch.Tensor  # [R * L] pool rows of each request's padded context (padding reads row 0)
    token_index: torch.Tensor  # [R * Q] query row of each padded position (padding repeats a real row)
    real_rows: torch.Tensor  # [N] positions in the padded [R * Q] that are real tokens
    real_tokens: torch.Tensor  # [N] their rows in the packed batch
    mask: torch.Tensor  # [R, 1, Q, L] bool, True = attend
    num_requests: int  # R
    q_max: int  # Q
    ctx_max: int  # L
    shared: list[SharedPrefix]  # prefixes left out of the padded contexts, attended to apart
    shared_tokens: torch.Tensor  # [S] the shared prefixes' tokens, prefix by prefix, in the packed batch
    shared_rows: torch.Tensor  # [S] the same tokens' positions in the padded [R * Q]
    bias: torch.Tensor | None = None  # [R, 1, Q * G, L] the mask as 0 / -inf in q's dtype (first layer)


def build_prefill_plan(meta: AttentionMetadata) -> PrefillPlan | None:
    """The padded batch of the requests with more than DECODE_MAX_Q new tokens; None if none."""
    q_lens = meta.cu_seqlens_q[1:] - meta.cu_seqlens_q[:-1]  # [B]
    chosen = torch.nonzero(q_lens > DECODE_MAX_Q).flatten()
    if chosen.numel() == 0:
        return None
    bs = meta.block_size
    shared: dict[tuple[int, tuple[int, ...]], list[int]] = {}  # (P, blocks) of a long prefix -> its readers
    for b in chosen.tolist():
        p = meta.prefix_lens_host[b]
        if p >= DENSE_PREFIX_MIN:
            shared.setdefault((p, tuple(meta.prefix_blocks_host[b][:-(-p // bs)])), []).append(b)
    cu = meta.cu_seqlens_q.tolist()
    q = q_lens[chosen].long()  # [R]
    prefix = meta.prefix_lens[chosen].long()
    prefix = prefix.masked_fill(prefix >= DENSE_PREFIX_MIN, 0)  # attended to apart
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
    position = {b: i for i, b in enumerate(chosen.tolist())}  # request -> its row in the padded batch
    prefixes = [SharedPrefix(torch.tensor(blocks), p, torch.tensor([t for b in readers for t in range(cu[b], cu[b + 1])]))
                for (p, blocks), readers in shared.items()]
    padded = [position[b] * q_max + j for readers in shared.values() for b in readers for j in range(cu[b + 1] - cu[b])]
    return PrefillPlan(
        gather=gather.flatten(), token_index=token_index.flatten(), real_rows=real_rows,
        real_tokens=token_index.flatten().index_select(0, real_rows), mask=mask[:, None],
        num_requests=r, q_max=q_max, ctx_max=ctx_max, shared=prefixes,
        shared_tokens=torch.cat([sp.tokens for sp in prefixes]) if prefixes else torch.empty(0, dtype=torch.long),
        shared_rows=torch.tensor(padded, dtype=torch.long))


def gather_segment(cache: torch.Tensor, blocks: torch.Tensor, length: int) -> torch.Tensor:
    """Slots 0..length-1 of a segment stored in `blocks`: cache [num_blocks, block_size, Hkv,
    hd] -> [Hkv, length, hd], by whole blocks (a contiguous copy each) when the pool is stored
    head-major or slot-major, else row by row."""
    num_kv_heads, head_dim = cache.shape[2], cache.shape[3]
    if cache.transpose(1, 2).is_contiguous():  # head-major, as the engine stores it
        picked = cache.transpose(1, 2).index_select(0, blocks)  # [n, Hkv, block_size, hd]
        return picked.transpose(0, 1).reshape(num_kv_heads, -1, head_dim)[:, :length]
    if cache.is_contiguous():
        return cache.index_select(0, blocks).reshape(-1, num_kv_heads, head_dim)[:length].transpose(0, 1)
    rows = blocks.repeat_interleave(cache.shape[1])[:length] * cache.shape[1] + torch.arange(length) % cache.shape[1]
    return gather_rows(cache, rows).transpose(0, 1)


def _grouped(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[R, Q, H, hd] -> [R, Hkv, Q * G, hd]: the query heads that read one kv head, stacked
    under it (row j * G + g is token j, head g of the group)."""
    r, n, h, d = x.shape
    return x.view(r, n, num_kv_heads, h // num_kv_heads, d).transpose(1, 2).reshape(r, num_kv_heads, -1, d)


def _ungrouped(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The inverse of _grouped, for out [R, Hkv, Q * G, hd] or logsumexp [R, Hkv, Q * G]."""
    r, hkv, rows = x.shape[:3]
    x = x.reshape(r, hkv, rows // (num_heads // hkv), num_heads // hkv, *x.shape[3:]).transpose(1, 2)
    return x.reshape(r, rows // (num_heads // hkv), num_heads, *x.shape[4:])


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
    group = num_heads // num_kv_heads
    kg = gather_rows(k_cache, plan.gather).view(r, ln, num_kv_heads, head_dim).transpose(1, 2)  # [R, Hkv, L, hd]
    vg = gather_rows(v_cache, plan.gather).view(r, ln, num_kv_heads, head_dim).transpose(1, 2)
    qg = _grouped(q.index_select(0, plan.token_index).view(r, qn, num_heads, head_dim), num_kv_heads)
    if plan.bias is None:
        plan.bias = torch.zeros(plan.mask.shape, dtype=q.dtype).masked_fill_(~plan.mask, float("-inf"))
        plan.bias = plan.bias.repeat_interleave(group, dim=2)  # [R, 1, Q * G, L]
    og, lse = _flash(qg, kg, vg, attn_mask=plan.bias, scale=scale)  # [R, Hkv, Q * G, hd], [R, Hkv, Q * G]
    out.index_copy_(0, plan.real_tokens,
                    _ungrouped(og, num_heads).reshape(r * qn, num_heads, head_dim).index_select(0, plan.real_rows))
    if not plan.shared:
        return out
    # every shared prefix's part, then one merge with the padded part by log-sum-exp
    tokens = plan.shared_tokens
    part = torch.empty(tokens.numel(), num_heads, head_dim, dtype=torch.float32)  # [n, H, hd]
    part_lse = torch.empty(tokens.numel(), num_heads, dtype=torch.float32)
    first = 0
    for sp in plan.shared:
        n = sp.tokens.numel()
        kp = gather_segment(k_cache, sp.blocks, sp.length)  # [Hkv, P, hd]
        vp = gather_segment(v_cache, sp.blocks, sp.length)
        qp = _grouped(q.index_select(0, sp.tokens)[None], num_kv_heads)[0]  # [Hkv, n * G, hd]
        op, lse_p = _dense_attention(qp, kp, vp, scale)
        part[first:first + n] = _ungrouped(op[None], num_heads)[0]
        part_lse[first:first + n] = _ungrouped(lse_p[None], num_heads)[0]
        first += n
    own_lse = _ungrouped(lse, num_heads).reshape(r * qn, num_heads).index_select(0, plan.shared_rows)
    both = torch.logaddexp(part_lse, own_lse)
    merged = part.mul_((part_lse - both).exp_()[..., None]).add_(
        out.index_select(0, tokens).float().mul_((own_lse - both).exp_()[..., None]))
    out.index_copy_(0, tokens, merged.to(out.dtype))
    return out


def _dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unmasked attention of q [Hkv, M, hd] over k, v [Hkv, P, hd]: (out [Hkv, M, hd], lse
    [Hkv, M] float32). Two matmuls in q's dtype around a softmax in float32 rounded to it, as
    HF's eager attention does (the matmuls run at ~3x the rate of torch's CPU flash kernel
    on these shapes)."""
    scores = torch.matmul(q, k.transpose(-1, -2))  # [Hkv, M, P]
    probs, lse = cpu_ops.softmax_lse(scores.view(-1, scores.shape[-1]), scale)
    return torch.matmul(probs.view_as(scores), v), lse.view(scores.shape[:2])
