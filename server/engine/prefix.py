"""The prefix: learned key/value vectors for every attention layer (Li & Liang 2021).

    kv: [num_layers, 2, num_kv_heads, prefix_len, head_dim]     # index 0 = key, 1 = value

Semantics (ARCHITECTURE.md, reproduced from HF PEFT's PREFIX_TUNING):
- keys are used as stored, never rotated by RoPE;
- a request's real tokens sit at positions P, P+1, ... where P is the total prefix length;
- every query attends to all P prefix slots, then causally to the request's own tokens;
- several prefixes compose by concatenation along prefix_len.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class PrefixError(ValueError):
    """A prefix that cannot be used with the loaded model; the message has the numbers."""


@dataclass(frozen=True)
class PrefixRef:
    """The identity of one stored prefix version. Every cache key carries all three."""

    tenant: str
    prefix_id: str
    version: str  # content hash of the stored tensor


@dataclass(frozen=True)
class ModelSpec:
    """What a prefix must match in the loaded base model."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    fingerprint: str
    max_model_len: int

    def kv_shape(self, prefix_len: int) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.num_kv_heads, prefix_len, self.head_dim)

    def peft_token_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass(frozen=True, eq=False)
class Prefix:
    """One prefix (or a composition of several): a host tensor plus where it came from."""

    kv: torch.Tensor  # [num_layers, 2, num_kv_heads, prefix_len, head_dim]
    refs: tuple[PrefixRef, ...] = field(default_factory=tuple)  # () for an anonymous prefix

    @property
    def length(self) -> int:
        return int(self.kv.shape[3])

    @property
    def key(self) -> tuple:
        """The residency key: (tenant, id, version) of every part, or the tensor identity."""
        return self.refs if self.refs else ("anonymous", id(self.kv))

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


def validate_kv(kv: torch.Tensor, spec: ModelSpec, what: str = "prefix") -> None:
    """Raise PrefixError naming the first mismatch between `kv` and the model."""
    if not isinstance(kv, torch.Tensor):
        raise PrefixError(f"{what} must be a tensor, got {type(kv).__name__}")
    if kv.dtype not in FLOAT_DTYPES:
        raise PrefixError(f"{what} has dtype {str(kv.dtype).removeprefix('torch.')}; "
                          "expected float32, bfloat16 or float16")
    if kv.dim() != 5:
        raise PrefixError(f"{what} has {kv.dim()} dims {tuple(kv.shape)}; expected 5: "
                          f"[num_layers={spec.num_layers}, 2, num_kv_heads={spec.num_kv_heads}, "
                          f"prefix_len, head_dim={spec.head_dim}]")
    layers, two, heads, plen, hd = kv.shape
    if layers != spec.num_layers:
        raise PrefixError(f"{what} has {layers} layers, model has {spec.num_layers}")
    if two != 2:
        raise PrefixError(f"{what} dim 1 is {two}; expected 2 (key, value)")
    if heads != spec.num_kv_heads:
        raise PrefixError(f"{what} has {heads} kv heads, model has {spec.num_kv_heads}")
    if hd != spec.head_dim:
        raise PrefixError(f"{what} has head_dim {hd}, model has {spec.head_dim}")
    if plen < 1:
        raise PrefixError(f"{what} has prefix_len {plen}; expected at least 1")
    if plen >= spec.max_model_len:
        raise PrefixError(f"{what} has prefix_len {plen}; the model's context is {spec.max_model_len}")
    if not torch.isfinite(kv).all():
        bad = int((~torch.isfinite(kv)).sum())
        raise PrefixError(f"{what} has {bad} non-finite values (NaN or inf)")


def from_prompt_embeddings(w: torch.Tensor, spec: ModelSpec, num_virtual_tokens: int | None = None) -> torch.Tensor:
    """PEFT's `prompt_embeddings` [P, L*2*Hkv*hd] -> kv [L, 2, Hkv, P, hd] (a copy)."""
    if w.dim() != 2:
        raise PrefixError(f"prompt_embeddings has {w.dim()} dims {tuple(w.shape)}; expected 2: "
                          f"[num_virtual_tokens, {spec.num_layers * 2 * spec.peft_token_dim()}]")
    p, width = w.shape
    if num_virtual_tokens is not None and p != num_virtual_tokens:
        raise PrefixError(f"prompt_embeddings has {p} rows, num_virtual_tokens says {num_virtual_tokens}")
    expected = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim
    if width != expected:
        raise PrefixError(
            f"prompt_embeddings rows have {width} values; the model needs num_layers({spec.num_layers})"
            f" * 2 * num_kv_heads({spec.num_kv_heads}) * head_dim({spec.head_dim}) = {expected}")
    kv = w.view(p, spec.num_layers, 2, spec.num_kv_heads, spec.head_dim).permute(1, 2, 3, 0, 4)
    return kv.contiguous()


def to_prompt_embeddings(kv: torch.Tensor) -> torch.Tensor:
    """kv [L, 2, Hkv, P, hd] -> PEFT's `prompt_embeddings` [P, L*2*Hkv*hd]."""
    layers, _, heads, p, hd = kv.shape
    return kv.permute(3, 0, 1, 2, 4).reshape(p, layers * 2 * heads * hd).contiguous()


def load_peft_adapter(folder: str | Path, spec: ModelSpec) -> torch.Tensor:
    """Read a HF PEFT PREFIX_TUNING adapter folder (safetensors only) into kv."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path = folder / "adapter_config.json"
    weights = folder / "adapter_model.safetensors"
    if not config_path.exists():
        raise PrefixError(f"{folder} has no adapter_config.json")
    if not weights.exists():
        pickled = folder / "adapter_model.bin"
        hint = " (adapter_model.bin is a pickle and is refused; save with safe_serialization)" if pickled.exists() else ""
        raise PrefixError(f"{folder} has no adapter_model.safetensors{hint}")
    config = json.loads(config_path.read_text())
    check_peft_config(config, spec)
    tensors = load_file(weights)
    if "prompt_embeddings" not in tensors:
        raise PrefixError(f"{weights.name} has no 'prompt_embeddings' tensor (has {sorted(tensors)})")
    return from_prompt_embeddings(tensors["prompt_embeddings"], spec, config.get("num_virtual_tokens"))


def check_peft_config(config: dict, spec: ModelSpec) -> None:
    if config.get("peft_type") != "PREFIX_TUNING":
        raise PrefixError(f"adapter peft_type is {config.get('peft_type')!r}; expected 'PREFIX_TUNING'")
    if config.get("num_transformer_submodules", 1) != 1:
        raise PrefixError("adapter has num_transformer_submodules "
                          f"{config.get('num_transformer_submodules')}; decoder-only models need 1")
    if config.get("num_layers") not in (None, spec.num_layers):
        raise PrefixError(f"adapter has num_layers {config['num_layers']}, model has {spec.num_layers}")


def compose(parts: list[Prefix]) -> Prefix:
    """Concatenate prefixes along prefix_len, in order (e.g. a task prefix, then a user's)."""
    if not parts:
        raise PrefixError("compose needs at least one prefix")
    if len(parts) == 1:
        return parts[0]
    dtype = parts[0].kv.dtype
    kv = torch.cat([p.kv.to(dtype) for p in parts], dim=3)
    refs = tuple(r for p in parts for r in p.refs)
    return Prefix(kv=kv, refs=refs)
