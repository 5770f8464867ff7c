"""Batches for the attention-kernel tests, and a naive dense attention to check them against.

A Case names the per-request numbers; make_batch lays them out in a paged pool whose block
ids are shuffled (never contiguous, never in order) and whose unused rows hold random
values too, so reading a wrong slot changes the result.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from kernels.attention_metadata import AttentionMetadata


@dataclass(frozen=True)
class Case:
    name: str
    q_lens: tuple[int, ...]  # new tokens per request this step
    prefix_lens: tuple[int, ...]
    seq_lens: tuple[int, ...]  # own tokens after this step's writes
    # Requests with the same group id read the same prefix blocks; None = all distinct.
    prefix_groups: tuple[int, ...] | None = None


CASES = [
    Case("decode_only", (1, 1, 1), (5, 0, 12), (7, 1, 20)),
    Case("prefill_only", (6, 9), (3, 8), (6, 9)),
    Case("mixed", (1, 7, 1, 4), (4, 0, 9, 16), (10, 7, 3, 12)),  # q 4 of 12 = a later prefill chunk
    Case("zero_prefix", (1, 5, 3), (0, 0, 0), (6, 5, 9)),
    Case("prefix_not_block_multiple", (2, 1), (5, 7), (2, 13)),
    Case("shared_prefix_blocks", (1, 3, 1, 2), (6, 9, 6, 6), (4, 3, 8, 5), prefix_groups=(0, 1, 0, 0)),
    Case("long_context", (1, 3), (40, 21), (37, 30)),  # several key tiles per segment
    # prefill chunks of three requests on one prefix (one a later chunk), a decode on it, and
    # a chunk on another prefix: with a low DENSE_PREFIX_MIN both prefixes are attended apart
    Case("chunks_sharing_a_prefix", (12, 9, 1, 10, 11), (40, 40, 40, 7, 0), (12, 20, 5, 10, 11),
         prefix_groups=(0, 0, 0, 1, 2)),
]


@dataclass
class Batch:
    q: torch.Tensor  # [T, H, hd]
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, hd]
    v_cache: torch.Tensor
    meta: AttentionMetadata
    prefix_blocks: list[list[int]]  # [B][*]
    own_blocks: list[list[int]]  # [B][*]


def make_batch(case: Case, block_size: int, num_kv_heads: int, group: int, head_dim: int,
               dtype: torch.dtype, seed: int = 0) -> Batch:
    rng = random.Random(seed)
    blocks_for = lambda n: -(-n // block_size)  # noqa: E731  ceil division
    groups = case.prefix_groups or tuple(range(len(case.q_lens)))
    need = sum(blocks_for(n) for n in case.seq_lens)
    need += sum(blocks_for(max(p for p, g2 in zip(case.prefix_lens, groups) if g2 == g)) for g in set(groups))
    num_blocks = need + 5  # spare blocks that no request owns
    free = list(range(num_blocks))
    rng.shuffle(free)

    group_blocks: dict[int, list[int]] = {}
    prefix_blocks, own_blocks = [], []
    for p, n, g in zip(case.prefix_lens, case.seq_lens, groups):
        if g not in group_blocks:
            longest = max(p2 for p2, g2 in zip(case.prefix_lens, groups) if g2 == g)
            group_blocks[g] = [free.pop() for _ in range(blocks_for(longest))]
        prefix_blocks.append(group_blocks[g][:blocks_for(p)])
        own_blocks.append([free.pop() for _ in range(blocks_for(n))])

    gen = torch.Generator().manual_seed(seed)
    num_heads = num_kv_heads * group
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    q = torch.randn(sum(case.q_lens), num_heads, head_dim, generator=gen).to(dtype)
    meta = AttentionMetadata.build(list(case.q_lens), list(case.prefix_lens), prefix_blocks,
                                   list(case.seq_lens), own_blocks, block_size)
    return Batch(q, k_cache, v_cache, meta, prefix_blocks, own_blocks)


def pool_rows(blocks: list[int], length: int, block_size: int) -> list[int]:
    """The first `length` pool rows of a segment, enumerated block by block."""
    rows = [blk * block_size + i for blk in blocks for i in range(block_size)]
    assert len(rows) >= length
    return rows[:length]


def naive_attention(batch: Batch, scale: float) -> torch.Tensor:
    """Dense float64 attention, one request at a time: the obviously-correct answer."""
    meta, q = batch.meta, batch.q
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, block_size = batch.k_cache.shape[2], batch.k_cache.shape[1]
    k_flat = batch.k_cache.reshape(-1, num_kv_heads, head_dim).double()
    v_flat = batch.v_cache.reshape(-1, num_kv_heads, head_dim).double()
    kv_head_of = torch.arange(num_heads) // (num_heads // num_kv_heads)  # [H]
    out = torch.empty(q.shape, dtype=torch.float64)
    t0 = 0
    for b, q_len in enumerate(meta.q_lens_host):
        p, n = meta.prefix_lens_host[b], meta.seq_lens_host[b]
        rows = (pool_rows(batch.prefix_blocks[b], p, block_size)
                + pool_rows(batch.own_blocks[b], n, block_size))
        keys = k_flat[rows][:, kv_head_of]  # [L, H, hd]
        values = v_flat[rows][:, kv_head_of]
        qb = q[t0:t0 + q_len].double()  # [q, H, hd]
        scores = torch.einsum("jhd,lhd->hjl", qb, keys) * scale  # [H, q, L]
        # New token j sits at own position n - q_len + j: it sees the whole prefix and own[0..that].
        visible = p + (n - q_len) + torch.arange(q_len)[:, None] + 1  # [q, 1]
        mask = torch.arange(p + n)[None, :] < visible  # [q, L]
        weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        out[t0:t0 + q_len] = torch.einsum("hjl,lhd->jhd", weights, values)
        t0 += q_len
    return out


def head_major(batch: Batch) -> Batch:
    """The same batch with the caches stored as the engine stores them: [num_blocks, Hkv,
    block_size, hd] in memory, seen as [num_blocks, block_size, Hkv, hd]."""
    def restore(cache: torch.Tensor) -> torch.Tensor:
        return cache.transpose(1, 2).contiguous().transpose(1, 2)

    return Batch(batch.q, restore(batch.k_cache), restore(batch.v_cache), batch.meta, batch.prefix_blocks,
                 batch.own_blocks)
