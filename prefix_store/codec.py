"""kv tensor (and a classification prefix's head) <-> safetensors bytes, and the content
hash that is a prefix's version.

A stored file holds `prefix_kv` and, for a SEQ_CLS prefix trained with its own classifier
head, `head_weight` and `head_bias` with the label names in the file's metadata: one file,
one hash, so a version names exactly one prefix and one head. A serving copy (the
kv cast to the serving dtype) has the same rules: its version is the hash of its own bytes."""

from __future__ import annotations

import hashlib
import json
import struct

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from server.prefix import FLOAT_DTYPES, ClassifierHead, PrefixError

TENSOR_NAME = "prefix_kv"
HEAD_WEIGHT = "head_weight"
HEAD_BIAS = "head_bias"
LABELS_KEY = "labels"  # metadata: a JSON list of label names


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


def encode(kv: torch.Tensor, head: ClassifierHead | None = None) -> tuple[bytes, str]:
    """Serialize kv [L, 2, Hkv, P, hd] (and a head); returns (bytes, version). Same tensors, same bytes."""
    check_layout(kv)
    tensors = {TENSOR_NAME: kv.detach().to("cpu").contiguous()}
    metadata = None
    if head is not None:
        tensors[HEAD_WEIGHT] = head.weight.detach().to("cpu", torch.float32).contiguous()
        tensors[HEAD_BIAS] = head.bias.detach().to("cpu", torch.float32).contiguous()
        if head.labels is not None:
            metadata = {LABELS_KEY: json.dumps(list(head.labels))}
    data = st_save(tensors, metadata=metadata)
    return data, content_version(data)


def decode(data: bytes, version: str) -> torch.Tensor:
    """Deserialize the kv, refusing bytes whose hash is not `version` (never serve the wrong tensor)."""
    check_version(data, version)
    return load(data)


def decode_parts(data: bytes, version: str) -> tuple[torch.Tensor, ClassifierHead | None]:
    """(kv, head or None), refusing bytes whose hash is not `version`."""
    check_version(data, version)
    return load_parts(data)


def check_version(data: bytes, version: str) -> None:
    """Raise ValueError unless `data` hashes to `version`."""
    actual = content_version(data)
    if actual != version:
        raise ValueError(f"tensor bytes ({len(data)}) hash to version {actual}, expected {version}")


def load(data: bytes) -> torch.Tensor:
    """Deserialize the kv of bytes whose version was checked (decode, or check_version earlier)."""
    return load_parts(data)[0]


def load_parts(data: bytes) -> tuple[torch.Tensor, ClassifierHead | None]:
    """(kv, head or None) of bytes whose version was checked."""
    tensors = st_load(data)
    if set(tensors) not in ({TENSOR_NAME}, {TENSOR_NAME, HEAD_WEIGHT, HEAD_BIAS}):
        raise ValueError(f"stored tensor file holds {sorted(tensors)}, expected ['{TENSOR_NAME}'] "
                         f"(and '{HEAD_WEIGHT}', '{HEAD_BIAS}' for a classification prefix)")
    if HEAD_WEIGHT not in tensors:
        return tensors[TENSOR_NAME], None
    labels = _metadata(data).get(LABELS_KEY)
    head = ClassifierHead(tensors[HEAD_WEIGHT], tensors[HEAD_BIAS],
                          None if labels is None else tuple(str(x) for x in json.loads(labels)))
    return tensors[TENSOR_NAME], head


def _metadata(data: bytes) -> dict[str, str]:
    """The __metadata__ of a safetensors file (its JSON header follows an 8-byte length)."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]).get("__metadata__") or {}
