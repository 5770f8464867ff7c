"""The prefixes of a batch of rows as one padded cache: for the encoder-style passes of the
classifier and of seq2seq decoding, which read prefixes as HF cache tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from server.prefix import ModelSpec


def padded_prefix_kv(kvs: Sequence[torch.Tensor | None], spec: ModelSpec, pmax: int, dtype: torch.dtype,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values), each [L, B, Hkv, Pmax, hd]: row i's prefix kv [L, 2, Hkv, P_i, hd]
    left-aligned, zeros after it (the caller's mask hides them) and for rows with none."""
    keys = torch.zeros((spec.num_layers, len(kvs), spec.num_kv_heads, pmax, spec.head_dim),
                       dtype=dtype, device=device)
    values = torch.zeros_like(keys)
    for i, kv in enumerate(kvs):
        if kv is not None:
            p = kv.shape[3]
            kv = kv.to(device, dtype)
            keys[:, i, :, :p] = kv[:, 0]
            values[:, i, :, :p] = kv[:, 1]
    return keys, values
