"""The kernels of a step, behind one interface per op, picked by device.

- `prefix_attention`: attention over (prefix segment ++ own segment) for a packed, varlen
  batch. The Triton kernel for CUDA tensors (when triton is installed), the CPU kernels
  (kernels/cpu_attention.py) on a CPU where they build, else the pure-torch reference. All
  share AttentionMetadata and the semantics written in kernels/torch_attention.py.
- `layer_ops(device)`: rms_norm, add_rms_norm, rotary, silu_and_mul: the C++ CPU kernels
  (kernels/cpu_ops.py) on a CPU where they build, else kernels/torch_ops.py.

Nothing here imports the engine.
"""

from __future__ import annotations

import functools

import torch

from kernels import cpu_attention, cpu_ops, torch_attention, torch_ops
from kernels.attention_metadata import AttentionMetadata

__all__ = ["AttentionMetadata", "layer_ops", "prefix_attention", "write_kv"]


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
    if q.device.type == "cpu" and cpu_ops.available():
        return cpu_attention.prefix_attention(q, k_cache, v_cache, meta, scale)
    return torch_attention.prefix_attention(q, k_cache, v_cache, meta, scale)


def layer_ops(device: torch.device):
    """The module whose rms_norm, add_rms_norm, rotary and silu_and_mul run on `device`."""
    if device.type == "cpu" and cpu_ops.available():
        return cpu_ops
    return torch_ops
