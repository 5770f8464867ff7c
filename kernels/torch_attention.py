"""Pure-torch prefix attention: the reference semantics and the CPU path.

Semantics (per request b, per new token j of its q_b tokens, per query head h):

    keys   = K[prefix slots 0..P_b-1] ++ K[own slots 0..n_b-1]       # P_b + n_b rows
    allowed(k) = k < P_b + (n_b - q_b) + j + 1                        # prefix + causal own
    out[b, j, h] = softmax(scale * q . keys[allowed]^T) @ values[allowed]
    with kv head h // (H // Hkv) (grouped-query attention)

The plan gathers each request's rows once per step (shared by every layer) and batches
requests with the same number of new tokens: all decodes together, prefill chunks of
equal length together.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels.attention_metadata import AttentionMetadata


@dataclass
class _Group:
    token_index: torch.Tensor  # [R * q] packed query rows of this group
    gather: torch.Tensor  # [R * max_kv] pool rows, row-major (padding points at row 0)
    mask: torch.Tensor  # [R, 1, q, max_kv] bool, True = attend
    num_rows: int  # R
    q_len: int  # q (1 for the decode group)
    masked_out: dict = field(default_factory=dict)  # query heads per kv head -> ~mask [R, 1, G*q, L]

    def blocked(self, group: int) -> torch.Tensor:
        """Where attention is not allowed, with each mask row repeated for the G query heads
        that share a kv head (built once per step, reused by every layer)."""
        if group not in self.masked_out:
            self.masked_out[group] = ~self.mask.repeat(1, 1, group, 1)
        return self.masked_out[group]


def _slots(blocks: list[int], length: int, block_size: int) -> list[int]:
    return [blocks[s // block_size] * block_size + s % block_size for s in range(length)]


def build_plan(meta: AttentionMetadata, device: torch.device) -> list[_Group]:
    """One group per distinct q_len (all decodes share q_len 1): requests in a group run as
    one batched attention, their key rows padded to the group's longest context."""
    starts = [0]
    for q in meta.q_lens_host:
        starts.append(starts[-1] + q)
    by_q_len: dict[int, list[int]] = {}
    for b, q in enumerate(meta.q_lens_host):
        by_q_len.setdefault(q, []).append(b)
    groups = []
    for q, members in sorted(by_q_len.items()):
        rows = [_slots(meta.prefix_blocks_host[b], meta.prefix_lens_host[b], meta.block_size)
                + _slots(meta.own_blocks_host[b], meta.seq_lens_host[b], meta.block_size) for b in members]
        width = max(len(r) for r in rows)
        gather = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long)
        ctx = torch.tensor([len(r) for r in rows])[:, None, None]  # [R, 1, 1]
        j = torch.arange(q)[None, :, None]  # [1, q, 1] new token j of the request's q
        k = torch.arange(width)[None, None, :]  # [1, 1, L]
        mask = (k <= ctx - q + j)[:, None]  # [R, 1, q, L]: prefix, own tokens up to j, no padding
        token_index = torch.tensor([starts[b] + i for b in members for i in range(q)], dtype=torch.long)
        groups.append(_Group(token_index.to(device), gather.view(-1).to(device), mask.to(device), len(members), q))
    return groups


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k_cache, v_cache: [num_blocks, block_size, Hkv, hd] (any strides); k, v: [T, Hkv, hd]."""
    blocks, slots = slot_mapping // k_cache.shape[1], slot_mapping % k_cache.shape[1]
    k_cache[blocks, slots] = k.to(k_cache.dtype)
    v_cache[blocks, slots] = v.to(v_cache.dtype)


def gather_rows(cache: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """cache [num_blocks, block_size, Hkv, hd] (any strides), pool rows [N] -> [N, Hkv, hd]."""
    if cache.is_contiguous():
        return cache.view(-1, *cache.shape[2:]).index_select(0, rows)
    return cache[rows // cache.shape[1], rows % cache.shape[1]]


def prefix_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, H, hd]; caches: [num_blocks, block_size, Hkv, hd] -> out [T, H, hd].

    The caches must already hold this step's keys and values (see write_kv). Matmuls run
    in the compute dtype and the softmax in float32 (as HF's eager attention does); on
    CPU this is several times faster than SDPA with a mask in bfloat16.
    """
    if "torch" not in meta.plan:
        meta.plan["torch"] = build_plan(meta, q.device)
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    for g in meta.plan["torch"]:
        r, n = g.num_rows, g.q_len
        # [R, Hkv, G*q, hd]: query heads grouped under the kv head they read, (G, q) flattened
        qg = (q.index_select(0, g.token_index).view(r, n, num_kv_heads, group, head_dim)
              .permute(0, 2, 3, 1, 4).reshape(r, num_kv_heads, group * n, head_dim))
        kg = gather_rows(k_cache, g.gather).view(r, -1, num_kv_heads, head_dim).permute(0, 2, 1, 3)
        vg = gather_rows(v_cache, g.gather).view(r, -1, num_kv_heads, head_dim).permute(0, 2, 1, 3)
        kg, vg = kg.to(q.dtype), vg.to(q.dtype)  # [R, Hkv, L, hd]
        scores = torch.matmul(qg, kg.transpose(-1, -2)).float().mul_(scale)  # [R, Hkv, G*q, L]
        scores.masked_fill_(g.blocked(group), float("-inf"))
        og = torch.matmul(scores.softmax(dim=-1).to(q.dtype), vg)  # [R, Hkv, G*q, hd]
        og = og.view(r, num_kv_heads, group, n, head_dim).permute(0, 3, 1, 2, 4)  # [R, q, Hkv, G, hd]
        out.index_copy_(0, g.token_index, og.reshape(r * n, num_heads, head_dim))
    return out
