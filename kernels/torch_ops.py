"""The elementwise ops of a Llama-family layer in plain torch: the reference for
kernels/csrc/cpu_ops.cpp and the path on GPUs (or where the CPU kernels cannot be built).

Each op rounds where HF's modules round (LlamaRMSNorm, apply_rotary_pos_emb, LlamaMLP), so
the engine computes what HF computes in any dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [T, D] -> weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """residual += x (in place, rounded to its dtype); returns rms_norm(residual)."""
    residual.add_(x)
    return rms_norm(residual, weight, eps)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """In place: x [T, heads, hd] = x * cos + rotate_half(x) * sin, with cos, sin [T, hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    x.copy_(x * cos[:, None, :] + rotated * sin[:, None, :])


def rotary_and_store(k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """rotary(k) in place, then k and v [T, Hkv, hd] into the caches [num_blocks, block_size,
    Hkv, hd] at pool rows slot_mapping [T]."""
    rotary(k, cos, sin)
    block_size = k_cache.shape[1]
    blocks, slots = slot_mapping // block_size, slot_mapping % block_size
    k_cache[blocks, slots] = k.to(k_cache.dtype)
    v_cache[blocks, slots] = v.to(v_cache.dtype)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2 * I] (gate, then up) -> silu(gate) * up  [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x [N, V] -> [N] int64: the first index of each row's maximum. max() is 2-3x faster than
    argmax() on a CPU and, like it, returns the first of tied maxima."""
    return x.max(dim=-1).indices
