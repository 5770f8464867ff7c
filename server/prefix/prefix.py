"""The prefix: learned key/value vectors for every attention layer (Li & Liang 2021).

    kv: [num_layers, 2, num_kv_heads, prefix_len, head_dim]     # index 0 = key, 1 = value

Semantics (docs/architecture.md, reproduced from HF PEFT's PREFIX_TUNING):
- keys are used as stored, never rotated by RoPE;
- a request's real tokens sit at positions P, P+1, ... where P is the total prefix length;
- every query attends to all P prefix slots, then causally to the request's own tokens;
- several prefixes compose by concatenation along prefix_len.

A seq2seq prefix may also carry, in the same layout with its own length, an encoder
self-attention part and a cross-attention part (the three-prefix form of Li & Liang's BART
code; semantics in server/engine/seq2seq.py and docs/peft-prefix-format.md); `kv` is then
the decoder self-attention part, exactly as in a PEFT SEQ_2_SEQ_LM adapter.

# NOTE: a Prefix is checked once, when it is made from outside data (`Prefix.make`: shape,
# dtype, finite values, context length); everything after that trusts it. Its `spec`
# says which model it was checked against, so an engine refuses one made for another
# model in O(1) instead of checking the tensor again.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from server.prefix.head import ClassifierHead
from server.prefix.model_spec import ModelKind, ModelSpec

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_anonymous_ids = itertools.count()  # never reused, unlike id() of a tensor that was freed


class PrefixError(ValueError):
    """A prefix that cannot be used with the loaded model; the message has the numbers."""


@dataclass(frozen=True)
class PrefixRef:
    """The identity of one stored prefix version. Every cache key carries all three."""

    tenant: str
    prefix_id: str
    version: str  # content hash of the stored tensor


@dataclass(frozen=True, eq=False)
class Prefix:
    """One prefix (or a composition of several): a checked host tensor and where it came from."""

    kv: torch.Tensor  # [num_layers, 2, num_kv_heads, prefix_len, head_dim], contiguous, on the host
    spec: ModelSpec  # the model it was checked against
    refs: tuple[PrefixRef, ...] = field(default_factory=tuple)  # () for an anonymous prefix
    serial: int = field(default_factory=lambda: next(_anonymous_ids), repr=False)  # identity of an anonymous one
    head: ClassifierHead | None = None  # a SEQ_CLS prefix's own classifier head (float32), if it has one
    encoder_kv: torch.Tensor | None = None  # [L, 2, Hkv, P_enc, hd]: seq2seq encoder self-attention part, if any
    cross_kv: torch.Tensor | None = None  # [L, 2, Hkv, P_cross, hd]: seq2seq cross-attention part, if any

    @classmethod
    def make(cls, kv: torch.Tensor, spec: ModelSpec, refs: tuple[PrefixRef, ...] = (),
             dtype: torch.dtype | None = None, head: ClassifierHead | None = None,
             encoder_kv: torch.Tensor | None = None, cross_kv: torch.Tensor | None = None) -> "Prefix":
        """Check `kv` (and the parts given) against `spec` (raises PrefixError naming the
        numbers) and keep contiguous host copies, cast to `dtype` when given (a head stays float32)."""
        validate_kv(kv, spec)
        if head is not None and spec.kind is not ModelKind.SEQ_CLS:
            raise PrefixError(f"a prefix with a classifier head needs a seq_cls model; this one is {spec.kind.value}")
        dtype = dtype or kv.dtype
        parts = {}
        for name, part in (("encoder_kv", encoder_kv), ("cross_kv", cross_kv)):
            if part is None:
                continue
            if spec.kind is not ModelKind.SEQ2SEQ_LM:
                raise PrefixError(f"a prefix with {name} needs a seq2seq_lm model; this one is {spec.kind.value}")
            validate_kv(part, spec, f"prefix {name}")
            parts[name] = part.detach().to("cpu", dtype).contiguous()
        kv = kv.detach().to("cpu", dtype).contiguous()
        return cls(kv=kv, spec=spec, refs=tuple(refs), head=None if head is None else head.on_host(), **parts)

    @property
    def length(self) -> int:
        return int(self.kv.shape[3])

    @property
    def key(self) -> tuple:
        """The residency key: (tenant, id, version) of every part, or this object's own serial
        number for an anonymous prefix (never reused, so a new tensor never hits an old one)."""
        return self.refs if self.refs else ("anonymous", self.serial)

    @property
    def encoder_length(self) -> int:
        return 0 if self.encoder_kv is None else int(self.encoder_kv.shape[3])

    @property
    def cross_length(self) -> int:
        return 0 if self.cross_kv is None else int(self.cross_kv.shape[3])

    @property
    def nbytes(self) -> int:
        parts = [t for t in (self.kv, self.encoder_kv, self.cross_kv) if t is not None]
        return sum(t.numel() * t.element_size() for t in parts) + (0 if self.head is None else self.head.nbytes)


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
    # A float32 sum is finite only if every element is (a NaN or inf makes it NaN or inf), and
    # it is one pass with no mask; only a sum that overflowed (or a real NaN) looks closer.
    if not torch.isfinite(kv.sum(dtype=torch.float32)) and not torch.isfinite(kv).all():
        bad = int((~torch.isfinite(kv)).sum())
        raise PrefixError(f"{what} has {bad} non-finite values (NaN or inf)")


def compose(parts: list[Prefix]) -> Prefix:
    """Concatenate prefixes along prefix_len, in order (e.g. a task prefix, then a user's)."""
    if not parts:
        raise PrefixError("compose needs at least one prefix")
    if len(parts) == 1:
        return parts[0]
    spec = parts[0].spec
    if any(p.head is not None for p in parts):
        raise PrefixError("a classification prefix with its own head cannot be composed with another prefix")
    if any(p.spec != spec for p in parts):
        raise PrefixError("prefixes checked against different models cannot be composed")
    total = sum(p.length for p in parts)
    if total >= spec.max_model_len:
        raise PrefixError(f"the composed prefixes have {total} slots; the model's context is {spec.max_model_len}")
    dtype = parts[0].kv.dtype
    kv = torch.cat([p.kv.to(dtype) for p in parts], dim=3)

    def joined(name: str) -> torch.Tensor | None:  # each seq2seq part concatenates on its own
        present = [getattr(p, name).to(dtype) for p in parts if getattr(p, name) is not None]
        return torch.cat(present, dim=3) if present else None

    return Prefix(kv=kv, spec=spec, refs=tuple(r for p in parts for r in p.refs),
                  encoder_kv=joined("encoder_kv"), cross_kv=joined("cross_kv"))
