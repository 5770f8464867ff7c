"""ModelRunner's writes into the paged pool: a prefix lands in exactly its blocks' slots."""

from __future__ import annotations

import torch

from server.engine.model_runner import ModelRunner
from tests.factories import tiny_llama


def test_write_prefix_fills_exactly_its_slots_and_reads_back():
    runner = ModelRunner(tiny_llama(), num_blocks=8, block_size=4)
    f = runner.forward
    kv = torch.randn(f.num_layers, 2, f.num_kv_heads, 6, f.head_dim, generator=torch.Generator().manual_seed(3))
    runner.kv_cache.fill_(7.0)
    runner.write_prefix([5, 2], kv)  # 6 tokens: block 5 full, 2 slots of block 2
    assert torch.equal(runner.read_slots([5, 2], 6), kv.to(runner.dtype))
    # slot s of block b: kv_cache[:, :, b, s] is [Hkv, hd]
    assert torch.equal(runner.kv_cache[:, :, 5, 1], kv[:, :, :, 1].to(runner.dtype))
    assert torch.equal(runner.kv_cache[:, :, 2, 1], kv[:, :, :, 5].to(runner.dtype))
    untouched = torch.ones(8, 4, dtype=torch.bool)
    untouched[5, :] = False
    untouched[2, :2] = False
    assert (runner.kv_cache[:, :, untouched] == 7.0).all()  # other blocks, and block 2 past the prefix
