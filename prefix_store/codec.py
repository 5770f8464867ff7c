"""kv tensor <-> safetensors bytes, and the content hash that is a prefix's version (and the
version of a serving copy: the same hash of the copy's own bytes)."""

from __future__ import annotations

import hashlib

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from server.prefix import FLOAT_DTYPES, PrefixError

TENSOR_NAME = "prefix_kv"


def content_version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16" for torch.bfloat16: the name records and serving-copy keys use."""
    return str(dtype).removeprefix("torch.")


def check_layout(kv: torch.Tensor) -> None:
    """The model-independent part of validation; the model check is `validate_kv`'s job."""
    if not isinstance(kv, torch.Tensor):
        raise PrefixError(f"prefix kv must be a torch.Tensor, got {type(kv).__name__}")
    if kv.dtype not in FLOAT_DTYPES:
        raise PrefixError(f"prefix kv has dtype {str(kv.dtype).removeprefix('torch.')}; "
                          "expected float32, bfloat16 or float16")
    if kv.dim() != 5 or kv.shape[1] != 2:
        raise PrefixError(f"prefix kv has shape {tuple(kv.shape)}; expected "
                          "[num_layers, 2, num_kv_heads, prefix_len, head_dim]")
    if kv.numel() == 0:
        raise PrefixError(f"prefix kv has shape {tuple(kv.shape)} with no elements")


def encode(kv: torch.Tensor) -> tuple[bytes, str]:
    """Serialize kv [L, 2, Hkv, P, hd]; returns (bytes, version). Same tensor, same bytes."""
    check_layout(kv)
    data = st_save({TENSOR_NAME: kv.detach().to("cpu").contiguous()})
    return data, content_version(data)


def decode(data: bytes, version: str) -> torch.Tensor:
    """Deserialize, refusing bytes whose hash is not `version` (never serve the wrong tensor)."""
    check_version(data, version)
    return load(data)


def check_version(data: bytes, version: str) -> None:
    """Raise ValueError unless `data` hashes to `version`."""
    actual = content_version(data)
    if actual != version:
        raise ValueError(f"tensor bytes ({len(data)}) hash to version {actual}, expected {version}")


def load(data: bytes) -> torch.Tensor:
    """Deserialize bytes whose version was checked (decode, or check_version earlier)."""
    tensors = st_load(data)
    if set(tensors) != {TENSOR_NAME}:
        raise ValueError(f"stored tensor file holds {sorted(tensors)}, expected ['{TENSOR_NAME}']")
    return tensors[TENSOR_NAME]
