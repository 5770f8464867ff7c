"""The CPU kernels (kernels/csrc/cpu_ops.cpp, built at first use) against their references:
attention against the naive dense float64 attention, split between the C++ kernel and the
SDPA prefill path in every way; the elementwise ops against kernels/torch_ops.py and HF's
own modules, bit for bit in bfloat16."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama

from attention_cases import CASES, Case, head_major, make_batch, naive_attention
from kernels import cpu_attention, cpu_ops, torch_ops

NUM_KV_HEADS = 2
HEAD_DIM = 16
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cpu_ops.available(), "the CPU kernels did not build on this machine (see the log)"


@pytest.mark.parametrize("dense_prefix_min", [128, 4], ids=["prefix-padded", "prefix-apart"])
@pytest.mark.parametrize("layout", ["slot-major", "head-major"])
@pytest.mark.parametrize("decode_max_q", [0, 2, 64], ids=["all-sdpa", "split", "all-cpp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("group", [1, 3], ids=lambda g: f"gqa{g}")
@pytest.mark.parametrize("block_size", [4, 16], ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_attention_matches_naive(case: Case, block_size: int, group: int, dtype: torch.dtype, decode_max_q: int,
                                 layout: str, dense_prefix_min: int, monkeypatch) -> None:
    monkeypatch.setattr(cpu_attention, "DECODE_MAX_Q", decode_max_q)
    monkeypatch.setattr(cpu_attention, "DENSE_PREFIX_MIN", dense_prefix_min)
    batch = make_batch(case, block_size, NUM_KV_HEADS, group, HEAD_DIM, dtype)
    if layout == "head-major":
        batch = head_major(batch)
    scale = HEAD_DIM ** -0.5
    out = cpu_attention.prefix_attention(batch.q, batch.k_cache, batch.v_cache, batch.meta, scale)
    assert out.dtype == dtype and out.shape == batch.q.shape
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), naive_attention(batch, scale), atol=tol, rtol=tol)


def _hf_llama_modules(dtype: torch.dtype):
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                      rms_norm_eps=1e-5)
    torch.manual_seed(0)
    norm = modeling_llama.LlamaRMSNorm(64, eps=cfg.rms_norm_eps)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
    return cfg, norm.to(dtype)


@pytest.mark.parametrize("impl", [cpu_ops, torch_ops], ids=["cpp", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_norms_round_as_hf_does(impl, dtype) -> None:
    cfg, norm = _hf_llama_modules(dtype)
    x = (torch.randn(37, 64) * 3).to(dtype)
    residual = torch.randn(37, 64).to(dtype)
    with torch.no_grad():
        want = norm(x)
        want_sum = residual + x
        want_after_add = norm(want_sum)
    tol = 0 if dtype == torch.bfloat16 else 1e-6  # bf16: the same roundings, so the same bits
    torch.testing.assert_close(impl.rms_norm(x, norm.weight.data, cfg.rms_norm_eps), want, atol=tol, rtol=tol)
    res = residual.clone()
    got = impl.add_rms_norm(x, res, norm.weight.data, cfg.rms_norm_eps)
    torch.testing.assert_close(res, want_sum, atol=0, rtol=0)
    torch.testing.assert_close(got, want_after_add, atol=tol, rtol=tol)


@pytest.mark.parametrize("impl", [cpu_ops, torch_ops], ids=["cpp", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rotary_and_mlp_activation_round_as_hf_does(impl, dtype) -> None:
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    rope = modeling_llama.LlamaRotaryEmbedding(cfg)
    tokens, heads, hd = 11, 4, 16
    qkv = torch.randn(tokens, (heads + 4) * hd).to(dtype)  # q then more: the view is strided, as in the model
    q = qkv[:, : heads * hd].view(tokens, heads, hd)
    positions = torch.arange(5, 5 + tokens)
    cos, sin = rope(q, positions[None])
    cos, sin = cos[0].to(dtype), sin[0].to(dtype)
    want, _ = modeling_llama.apply_rotary_pos_emb(q.transpose(0, 1)[None], q.transpose(0, 1)[None], cos[None], sin[None])
    impl.rotary(q, cos.contiguous(), sin.contiguous())
    tol = 0 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(q, want[0].transpose(0, 1), atol=tol, rtol=tol)

    gate_up = torch.randn(tokens, 2 * 96).to(dtype) * 4
    gate, up = gate_up[:, :96], gate_up[:, 96:]
    want = torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(impl.silu_and_mul(gate_up.contiguous()), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("impl", [cpu_ops, torch_ops], ids=["cpp", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_argmax_rows_takes_the_first_of_tied_maxima(impl, dtype) -> None:
    x = torch.randn(9, 1000).to(dtype)
    x[0, [3, 700]] = 50.0  # a tie: the first wins, as argmax() does
    x[1, :] = -7.0  # all equal
    want = x.float().argmax(dim=-1)
    assert impl.argmax_rows(x).tolist() == want.tolist()
    assert want[0] == 3 and want[1] == 0


@pytest.mark.parametrize("impl", [cpu_ops, torch_ops], ids=["cpp", "torch"])
@pytest.mark.parametrize("layout", ["slot-major", "head-major"])
def test_rotary_and_store_writes_the_rotated_keys_and_the_values(impl, layout) -> None:
    tokens, heads, hd, blocks, bs = 5, 2, 16, 6, 4
    if layout == "slot-major":
        k_cache, v_cache = torch.zeros(blocks, bs, heads, hd), torch.zeros(blocks, bs, heads, hd)
    else:  # [num_blocks, Hkv, block_size, hd] storage seen as [num_blocks, block_size, Hkv, hd]
        k_cache, v_cache = (torch.zeros(blocks, heads, bs, hd).transpose(1, 2) for _ in range(2))
    kv = torch.randn(tokens, 2 * heads * hd)
    k, v = kv[:, : heads * hd].view(tokens, heads, hd), kv[:, heads * hd:].view(tokens, heads, hd)
    cos, sin = torch.randn(tokens, hd), torch.randn(tokens, hd)
    want_k = k.clone()
    torch_ops.rotary(want_k, cos, sin)
    slots = torch.tensor([9, 2, 23, 4, 13])
    impl.rotary_and_store(k, v, cos, sin, k_cache, v_cache, slots)
    for t, slot in enumerate(slots.tolist()):
        torch.testing.assert_close(k_cache[slot // bs, slot % bs], want_k[t])
        torch.testing.assert_close(v_cache[slot // bs, slot % bs], v[t])
    written = {s // bs * 100 + s % bs for s in slots.tolist()}
    others = [(b, s) for b in range(blocks) for s in range(bs) if b * 100 + s not in written]
    assert all(k_cache[b, s].abs().sum() == 0 for b, s in others)
