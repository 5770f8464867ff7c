"""Triton prefix attention: the GPU path of kernels.prefix_attention.

Same semantics as kernels/torch_attention.py, computed as a FlashAttention-style online
softmax (Dao et al. 2022, "FlashAttention") that reads keys and values straight from the
paged pool, so neither segment is ever gathered into a dense tensor. A program owns one
tile of BLOCK_M query rows of one request and one query head; it walks the request's
prefix segment (every row sees all of it) and then its own segment (causal) in tiles of
BLOCK_N slots, translating each slot through the segment's block table.

The grid comes from the host lists in AttentionMetadata, so launching never syncs the
device; the tile table is built once per step and shared by all layers via meta.plan.
Runs on CPU tensors under TRITON_INTERPRET=1 (how the tests check it without a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.attention_metadata import AttentionMetadata

__all__ = ["prefix_attention"]

_LOG2_E = 1.4426950408889634  # softmax runs in base 2: exp(x) == exp2(x * log2(e))


@triton.jit
def _attend_segment(acc, m_i, l_i, q, k_ptr, v_ptr, table_ptr, seg_len, kv_end, row_limit,
                    kv_head, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                    offs_d, d_mask, qk_scale,
                    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold slots [0, kv_end) of one segment into the running softmax state.

    Query row i may see slot s iff s < row_limit[i] (and s < seg_len). State per row:
    m_i = running max of the base-2 logits, l_i = running sum of exp2(logit - m_i),
    acc = running sum of exp2(logit - m_i) * v.
    """
    for start in range(0, kv_end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)  # [N] slot indices within the segment
        n_mask = offs_n < seg_len
        # Slot s lives at pool block table[s // PAGE], row s % PAGE; int64 so big pools don't overflow.
        block = tl.load(table_ptr + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
        page_row = offs_n % PAGE
        kv_mask = n_mask[None, :] & d_mask[:, None]
        k = tl.load(k_ptr + block[None, :] * stride_kb + page_row[None, :] * stride_ks
                    + kv_head * stride_kh + offs_d[:, None], mask=kv_mask, other=0.0)  # [D, N]
        s = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION) * qk_scale  # [M, N] fp32
        allowed = (offs_n[None, :] < row_limit[:, None]) & n_mask[None, :]
        s = tl.where(allowed, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no allowed slot yet keeps m = -inf; subtracting 0 instead keeps
        # exp2(-inf - -inf) = NaN out of the state.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])  # [M, N]
        alpha = tl.exp2(m_i - m_safe)  # [M] rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)

        v = tl.load(v_ptr + block[:, None] * stride_vb + page_row[:, None] * stride_vs
                    + kv_head * stride_vh + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :],
                    other=0.0)  # [N, D]
        # p is rounded to the cache dtype before the second matmul, as on the tensor cores.
        p = p.to(v_ptr.dtype.element_ty).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p, v.to(q.dtype), input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _prefix_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr,
        tile_ptr,  # [2, num_tiles] int32: request of each tile, then its first query row
        num_tiles,
        cu_seqlens_q_ptr, prefix_lens_ptr, prefix_tables_ptr, seq_lens_ptr, own_tables_ptr,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        stride_prefix_table, stride_own_table,
        qk_scale, head_dim,
        GROUP: tl.constexpr,  # query heads per kv head
        PAGE: tl.constexpr,  # the pool's block_size
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    b = tl.load(tile_ptr + tile)
    tile_start = tl.load(tile_ptr + num_tiles + tile)

    q_begin = tl.load(cu_seqlens_q_ptr + b)
    q_len = tl.load(cu_seqlens_q_ptr + b + 1) - q_begin
    prefix_len = tl.load(prefix_lens_ptr + b)
    seq_len = tl.load(seq_lens_ptr + b)

    offs_m = tile_start + tl.arange(0, BLOCK_M)  # [M] query rows, relative to the request
    m_mask = offs_m < q_len
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim  # head_dim is padded up to a power of two
    q_rows = (q_begin + offs_m).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # [M, D]
    if UPCAST_DOT:
        # The interpreter multiplies bfloat16 bit patterns in tl.dot (triton-lang/triton#11584);
        # an fp32 dot of bf16/fp16 values gives exactly the tensor cores' products.
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Prefix segment: every query row sees all of it.
    acc, m_i, l_i = _attend_segment(
        acc, m_i, l_i, q, k_ptr, v_ptr, prefix_tables_ptr + b * stride_prefix_table,
        prefix_len, prefix_len, prefix_len + tl.zeros([BLOCK_M], tl.int32),
        kv_head, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        offs_d, d_mask, qk_scale, PAGE, BLOCK_N, DOT_PRECISION)
    # Own segment: the new tokens are its last q_len slots; row j sees slots < seq_len - q_len + j + 1.
    row_limit = seq_len - q_len + offs_m + 1
    kv_end = tl.minimum(seq_len, seq_len - q_len + tile_start + BLOCK_M)  # skip slots no row sees
    acc, m_i, l_i = _attend_segment(
        acc, m_i, l_i, q, k_ptr, v_ptr, own_tables_ptr + b * stride_own_table,
        seq_len, kv_end, row_limit,
        kv_head, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        offs_d, d_mask, qk_scale, PAGE, BLOCK_N, DOT_PRECISION)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # l_i == 0 only on padding rows
    tl.store(out_ptr + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


@dataclass
class TritonPlan:
    """Per-step launch plan, shared by every layer through meta.plan."""

    tiles: torch.Tensor  # [2, num_tiles] int32 on the device: request, first query row
    num_tiles: int
    block_m: int  # query rows per program


def build_plan(meta: AttentionMetadata, device: torch.device) -> TritonPlan:
    # Decode steps (q_len 1) get the smallest tile tl.dot accepts; prefill chunks get bigger ones.
    block_m = 16 if max(meta.q_lens_host, default=1) <= 16 else 64
    requests: list[int] = []
    starts: list[int] = []
    for b, q_len in enumerate(meta.q_lens_host):
        for start in range(0, q_len, block_m):
            requests.append(b)
            starts.append(start)
    tiles = torch.tensor([requests, starts], dtype=torch.int32).to(device)
    return TritonPlan(tiles=tiles, num_tiles=len(requests), block_m=block_m)


def prefix_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     meta: AttentionMetadata, scale: float, block_n: int = 64) -> torch.Tensor:
    """q: [T, H, hd]; caches: [num_blocks, block_size, Hkv, hd] -> out [T, H, hd] (q's dtype).

    Semantics (per request b, per new token j of its q_b tokens, per query head h):

        P, n = prefix_lens[b], seq_lens[b]
        keys = K[prefix slots 0..P-1 of b] ++ K[own slots 0..n-1 of b]   # slot s -> table[s // bs], s % bs
        allowed(k) = k < P + (n - q_b) + j + 1                           # whole prefix + causal own
        out[b, j, h] = softmax(scale * q[b, j, h] . keys[allowed, h // (H // Hkv)]) @ values[allowed, ...]

    The caches must already hold this step's keys and values (see kernels.write_kv). block_n is the
    number of slots each inner step reads (a power of two >= 16).
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    if k_cache.shape != v_cache.shape or k_cache.shape[3] != head_dim:
        raise ValueError(f"k cache {tuple(k_cache.shape)} and v cache {tuple(v_cache.shape)} "
                         f"must both be [num_blocks, block_size, Hkv, {head_dim}]")
    if k_cache.shape[1] != meta.block_size:
        raise ValueError(f"cache block size {k_cache.shape[1]} != metadata block size {meta.block_size}")
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("the kv caches must be contiguous in head_dim")
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return out
    if q.stride(2) != 1:
        q = q.contiguous()
    if "triton" not in meta.plan:
        meta.plan["triton"] = build_plan(meta, q.device)
    plan = meta.plan["triton"]

    # CPU tensors only run under the interpreter, whose tl.dot cannot take bfloat16.
    interpreted = q.device.type == "cpu"
    grid = (plan.num_tiles, num_heads)
    _prefix_attention_kernel[grid](
        q, k_cache, v_cache, out, plan.tiles, plan.num_tiles,
        meta.cu_seqlens_q, meta.prefix_lens, meta.prefix_block_tables, meta.seq_lens, meta.block_tables,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        meta.prefix_block_tables.stride(0), meta.block_tables.stride(0),
        scale * _LOG2_E, head_dim,
        GROUP=num_heads // num_kv_heads, PAGE=meta.block_size,
        BLOCK_M=plan.block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        UPCAST_DOT=interpreted,
        # fp32 stays fp32 (no TF32) so the GPU matches the reference to ~1e-5.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out
