"""Attention over (prefix segment ++ own segment) for a packed, varlen batch.

`prefix_attention` picks the Triton kernel for CUDA tensors (when triton is installed)
and the pure-torch reference everywhere else. Both share AttentionMetadata and the
semantics written in kernels/torch_attention.py. Nothing here imports the engine.
"""

from __future__ import annotations

import functools

import torch

from kernels.attention_metadata import AttentionMetadata
from kernels import torch_attention

__all__ = ["AttentionMetadata", "prefix_attention", "write_kv"]


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    torch_attention.write_kv(k_cache, v_cache, k, v, slot_mapping)


def prefix_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, H, hd]; caches: [num_blocks, block_size, Hkv, hd] -> [T, H, hd]."""
    if q.is_cuda and _triton_available():
        from kernels import triton_attention

        return triton_attention.prefix_attention(q, k_cache, v_cache, meta, scale)
    return torch_attention.prefix_attention(q, k_cache, v_cache, meta, scale)
