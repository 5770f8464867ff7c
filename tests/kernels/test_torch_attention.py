"""The pure-torch prefix attention (the CPU path) against a naive dense float64 attention."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from attention_cases import CASES, Case, head_major, make_batch, naive_attention, pool_rows
from kernels import torch_attention
from kernels.attention_metadata import AttentionMetadata

NUM_KV_HEADS = 2
HEAD_DIM = 16
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("layout", ["slot-major", "head-major"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("group", [1, 2, 4], ids=lambda g: f"gqa{g}")
@pytest.mark.parametrize("block_size", [4, 16], ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_naive_attention(case: Case, block_size: int, group: int, dtype: torch.dtype, layout: str) -> None:
    batch = make_batch(case, block_size, NUM_KV_HEADS, group, HEAD_DIM, dtype)
    if layout == "head-major":
        batch = head_major(batch)
    scale = HEAD_DIM ** -0.5
    out = torch_attention.prefix_attention(batch.q, batch.k_cache, batch.v_cache, batch.meta, scale)
    assert out.dtype == dtype and out.shape == batch.q.shape
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), naive_attention(batch, scale), atol=tol, rtol=tol)


def test_plan_is_reused_across_layers() -> None:
    # Each layer has its own cache; the metadata (and its plan) is shared by all of them.
    batch = make_batch(CASES[2], 4, NUM_KV_HEADS, 2, HEAD_DIM, torch.float32)
    torch_attention.prefix_attention(batch.q, batch.k_cache, batch.v_cache, batch.meta, 0.25)
    plan = batch.meta.plan["torch"]
    other = replace(batch, q=torch.randn_like(batch.q), k_cache=torch.randn_like(batch.k_cache),
                    v_cache=torch.randn_like(batch.v_cache))  # the next layer: same layout, new values
    out = torch_attention.prefix_attention(other.q, other.k_cache, other.v_cache, batch.meta, 0.25)
    assert batch.meta.plan["torch"] is plan
    torch.testing.assert_close(out.double(), naive_attention(other, 0.25), atol=1e-5, rtol=1e-5)


def test_slot_mapping_hand_computed() -> None:
    # block_size 4; request 0 owns blocks [7, 2] with 6 tokens, the last 3 new: positions 3, 4, 5.
    # Request 1 owns block [5] with 2 tokens, 1 new: position 1.
    meta = AttentionMetadata.build([3, 1], [0, 4], [[], [9]], [6, 2], [[7, 2], [5]], block_size=4)
    assert meta.slot_mapping.tolist() == [7 * 4 + 3, 2 * 4 + 0, 2 * 4 + 1, 5 * 4 + 1]
    assert meta.slot_mapping.dtype == torch.int64
    assert meta.cu_seqlens_q.tolist() == [0, 3, 4]
    assert meta.block_tables.tolist() == [[7, 2], [5, 0]]
    assert meta.prefix_block_tables.tolist() == [[0], [9]]


@pytest.mark.parametrize("block_size", [4, 16], ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_slot_mapping_points_at_the_new_tokens(case: Case, block_size: int) -> None:
    batch = make_batch(case, block_size, NUM_KV_HEADS, 1, HEAD_DIM, torch.float32)
    expected: list[int] = []
    for q_len, n, blocks in zip(case.q_lens, case.seq_lens, batch.own_blocks):
        expected += pool_rows(blocks, n, block_size)[n - q_len:]
    assert batch.meta.slot_mapping.tolist() == expected
    assert len(set(expected)) == len(expected)


def test_write_kv_fills_the_mapped_slots() -> None:
    batch = make_batch(CASES[2], 4, NUM_KV_HEADS, 1, HEAD_DIM, torch.float32)
    num_tokens = batch.q.shape[0]
    k = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM)
    v = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM)
    k_before = batch.k_cache.clone()
    torch_attention.write_kv(batch.k_cache, batch.v_cache, k, v, batch.meta.slot_mapping)
    k_flat = batch.k_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)
    slots = batch.meta.slot_mapping
    assert torch.equal(k_flat[slots], k)
    assert torch.equal(batch.v_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[slots], v)
    untouched = torch.ones(k_flat.shape[0], dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(k_flat[untouched], k_before.view(-1, NUM_KV_HEADS, HEAD_DIM)[untouched])


def test_build_rejects_more_new_tokens_than_the_segment_holds() -> None:
    with pytest.raises(ValueError, match="schedules 5 new tokens but its own segment holds 3"):
        AttentionMetadata.build([5], [0], [[]], [3], [[0]], block_size=4)
