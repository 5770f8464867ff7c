"""Pure-torch prefix attention: the reference semantics and the CPU path.

Semantics (per request b, per new token j of its q_b tokens, per query head h):

    keys   = K[prefix slots 0..P_b-1] ++ K[own slots 0..n_b-1]       # P_b + n_b rows
    allowed(k) = k < P_b + (n_b - q_b) + j + 1                        # prefix + causal own
    out[b, j, h] = softmax(scale * q . keys[allowed]^T) @ values[allowed]
    with kv head h // (H // Hkv) (grouped-query attention)

The plan gathers each request's rows once per step (shared by every layer): decode
requests (one new token) run as one batched attention; prefill chunks run one each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.attention_metadata import AttentionMetadata


@dataclass
class _Group:
    token_index: torch.Tensor  # [G * q] packed query rows of this group
    gather: torch.Tensor  # [G, max_kv] pool rows (padded rows point at row 0)
    mask: torch.Tensor  # [G, 1, q, max_kv] bool, True = attend
    num_rows: int  # G
    q_len: int  # q (1 for the decode group)


def _slots(blocks: list[int], length: int, block_size: int) -> list[int]:
    return [blocks[s // block_size] * block_size + s % block_size for s in range(length)]


def build_plan(meta: AttentionMetadata, device: torch.device) -> list[_Group]:
    groups: list[_Group] = []
    starts = [0]
    for q in meta.q_lens_host:
        starts.append(starts[-1] + q)
    decode = [b for b, q in enumerate(meta.q_lens_host) if q == 1]
    if decode:
        rows = [_slots(meta.prefix_blocks_host[b], meta.prefix_lens_host[b], meta.block_size)
                + _slots(meta.own_blocks_host[b], meta.seq_lens_host[b], meta.block_size) for b in decode]
        width = max(len(r) for r in rows)
        gather = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long)
        lens = torch.tensor([len(r) for r in rows])
        mask = (torch.arange(width)[None, :] < lens[:, None])[:, None, None, :]
        groups.append(_Group(torch.tensor([starts[b] for b in decode], dtype=torch.long).to(device),
                             gather.to(device), mask.to(device), len(decode), 1))
    for b, q in enumerate(meta.q_lens_host):
        if q == 1:
            continue
        row = (_slots(meta.prefix_blocks_host[b], meta.prefix_lens_host[b], meta.block_size)
               + _slots(meta.own_blocks_host[b], meta.seq_lens_host[b], meta.block_size))
        ctx = len(row)
        j = torch.arange(q)[:, None]
        k = torch.arange(ctx)[None, :]
        mask = (k <= ctx - q + j)[None, None]
        groups.append(_Group(torch.arange(starts[b], starts[b] + q).to(device),
                             torch.tensor([row], dtype=torch.long).to(device), mask.to(device), 1, q))
    return groups


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k_cache, v_cache: [num_blocks, block_size, Hkv, hd]; k, v: [T, Hkv, hd]."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def prefix_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, H, hd]; caches: [num_blocks, block_size, Hkv, hd] -> out [T, H, hd].

    The caches must already hold this step's keys and values (see write_kv). Matmuls run
    in the compute dtype and the softmax in float32 (as HF's eager attention does); on
    CPU this is several times faster than SDPA with a mask in bfloat16.
    """
    if meta.plan is None:
        meta.plan = build_plan(meta, q.device)
    k_flat = k_cache.view(-1, *k_cache.shape[2:])  # [num_slots, Hkv, hd]
    v_flat = v_cache.view(-1, *v_cache.shape[2:])
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    for g in meta.plan:
        r, n = g.num_rows, g.q_len
        # [R, Hkv, G*q, hd]: query heads grouped under the kv head they read, (G, q) flattened
        qg = (q.index_select(0, g.token_index).view(r, n, num_kv_heads, group, head_dim)
              .permute(0, 2, 3, 1, 4).reshape(r, num_kv_heads, group * n, head_dim))
        kg = k_flat[g.gather].to(q.dtype).permute(0, 2, 1, 3)  # [R, Hkv, L, hd]
        vg = v_flat[g.gather].to(q.dtype).permute(0, 2, 1, 3)
        scores = torch.matmul(qg, kg.transpose(-1, -2)).float() * scale  # [R, Hkv, G*q, L]
        mask = g.mask if group == 1 else g.mask.repeat(1, 1, group, 1)  # [R, 1, G*q, L]
        scores.masked_fill_(~mask, float("-inf"))
        og = torch.matmul(scores.softmax(dim=-1).to(q.dtype), vg)  # [R, Hkv, G*q, hd]
        og = og.view(r, num_kv_heads, group, n, head_dim).permute(0, 3, 1, 2, 4)  # [R, q, Hkv, G, hd]
        out.index_copy_(0, g.token_index, og.reshape(r * n, num_heads, head_dim))
    return out
