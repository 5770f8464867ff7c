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
from dataclasses import dataclass

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from server.prefix import FLOAT_DTYPES, ClassifierHead, PrefixError

TENSOR_NAME = "prefix_kv"
HEAD_WEIGHT = "head_weight"
HEAD_BIAS = "head_bias"
LABELS_KEY = "labels"  # metadata: a JSON list of label names
ENCODER_KV = "encoder_kv"  # a seq2seq prefix's encoder self-attention part
CROSS_KV = "cross_kv"  # a seq2seq prefix's cross-attention part
_PLAIN, _WITH_HEAD = {TENSOR_NAME}, {TENSOR_NAME, HEAD_WEIGHT, HEAD_BIAS}


@dataclass(frozen=True, eq=False)
class StoredTensors:
    """Everything one stored file holds."""

    kv: torch.Tensor  # [L, 2, Hkv, P, hd], the (decoder) prefix
    head: ClassifierHead | None = None  # a SEQ_CLS prefix's own head
    encoder_kv: torch.Tensor | None = None  # [L, 2, Hkv, P_enc, hd], seq2seq three-prefix form only
    cross_kv: torch.Tensor | None = None  # [L, 2, Hkv, P_cross, hd], seq2seq three-prefix form only


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


def check_part(part: torch.Tensor, name: str, kv: torch.Tensor) -> None:
    """An encoder or cross part: the layout of `kv`, same layers, heads, head_dim and dtype."""
    check_layout(part)
    if (part.shape[0], part.shape[2], part.shape[4], part.dtype) != (kv.shape[0], kv.shape[2], kv.shape[4], kv.dtype):
        raise PrefixError(f"{name} has shape {tuple(part.shape)} {dtype_name(part.dtype)}; the prefix kv has "
                          f"{tuple(kv.shape)} {dtype_name(kv.dtype)} (layers, kv heads, head_dim and dtype must match)")


def encode(kv: torch.Tensor, head: ClassifierHead | None = None, encoder_kv: torch.Tensor | None = None,
           cross_kv: torch.Tensor | None = None) -> tuple[bytes, str]:
    """Serialize kv [L, 2, Hkv, P, hd] (and a head, or a seq2seq prefix's encoder and cross
    parts); returns (bytes, version). Same tensors, same bytes."""
    check_layout(kv)
    tensors = {TENSOR_NAME: kv.detach().to("cpu").contiguous()}
    for name, part in ((ENCODER_KV, encoder_kv), (CROSS_KV, cross_kv)):
        if part is not None:
            if head is not None:
                raise PrefixError(f"a prefix with a classifier head cannot also have {name}")
            check_part(part, name, kv)
            tensors[name] = part.detach().to("cpu").contiguous()
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


def decode_all(data: bytes, version: str) -> StoredTensors:
    """Every tensor of the file (kv, head, encoder and cross parts), refusing bytes whose hash is not `version`."""
    check_version(data, version)
    return load_all(data)


def check_version(data: bytes, version: str) -> None:
    """Raise ValueError unless `data` hashes to `version`."""
    actual = content_version(data)
    if actual != version:
        raise ValueError(f"tensor bytes ({len(data)}) hash to version {actual}, expected {version}")


def load(data: bytes) -> torch.Tensor:
    """Deserialize the kv of bytes whose version was checked (decode, or check_version earlier)."""
    return load_all(data).kv


def load_parts(data: bytes) -> tuple[torch.Tensor, ClassifierHead | None]:
    """(kv, head or None) of bytes whose version was checked."""
    stored = load_all(data)
    return stored.kv, stored.head


def load_all(data: bytes) -> StoredTensors:
    """Every tensor of bytes whose version was checked."""
    tensors = st_load(data)
    names = set(tensors)
    if not (names in (_PLAIN, _WITH_HEAD) or (_PLAIN <= names <= _PLAIN | {ENCODER_KV, CROSS_KV})):
        raise ValueError(f"stored tensor file holds {sorted(tensors)}, expected ['{TENSOR_NAME}'] "
                         f"(and '{HEAD_WEIGHT}', '{HEAD_BIAS}' for a classification prefix, or "
                         f"'{ENCODER_KV}', '{CROSS_KV}' for a seq2seq prefix's other parts)")
    kv = tensors[TENSOR_NAME]
    for name in (ENCODER_KV, CROSS_KV):
        if name in tensors:
            try:
                check_part(tensors[name], name, kv)
            except PrefixError as e:
                raise ValueError(str(e)) from e
    head = None
    if HEAD_WEIGHT in tensors:
        labels = _metadata(data).get(LABELS_KEY)
        head = ClassifierHead(tensors[HEAD_WEIGHT], tensors[HEAD_BIAS],
                              None if labels is None else tuple(str(x) for x in json.loads(labels)))
    return StoredTensors(kv, head, tensors.get(ENCODER_KV), tensors.get(CROSS_KV))


def _metadata(data: bytes) -> dict[str, str]:
    """The __metadata__ of a safetensors file (its JSON header follows an 8-byte length)."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]).get("__metadata__") or {}
