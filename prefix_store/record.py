"""What the store says about one stored prefix version, and the events it publishes."""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Literal

from server.prefix import PrefixRef


@dataclass(frozen=True)
class PrefixRecord:
    """Metadata of one prefix version. `version` names exactly one tensor, forever."""

    tenant: str
    prefix_id: str
    version: str  # sha256 of the safetensors bytes, first 16 hex digits
    num_virtual_tokens: int  # prefix_len P of kv [L, 2, Hkv, P, hd]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # "float32" | "bfloat16" | "float16"
    bytes: int  # size of the kv tensor data (numel * element size)
    created_at: float  # unix epoch seconds of this version's upload
    description: str
    model_fingerprint: str  # the base model the prefix was made for
    shared: bool = False  # the admin tenant's prefix, usable by every tenant as `shared/<id>`
    # "tuned": learned vectors (an upload, a personalization job); "prompt": the keys and
    # values the model computed for a text (keys rotated at positions 0..P-1)
    kind: str = "tuned"
    # The prefixes it was trained after, in order (a personalization job records its task
    # prefix and that prefix's version; () = trained alone). Shown to its owner; serving does
    # not check it yet. None: not recorded (uploads, and prefixes stored before this field
    # existed).
    trained_after: tuple[PrefixRef, ...] | None = None
    # Serving copies of this version: dtype name -> content hash of the copy's safetensors
    # bytes, stored under Keys.serving_copy (the tensor above cast to that dtype, so a server
    # in that dtype reads half the bytes of float32 and casts nothing). Not part of the
    # version, and not counted in `bytes` nor in the tenant's quota. {}: none yet (and
    # prefixes stored before copies existed).
    serving_copies: dict[str, str] = field(default_factory=dict)
    # A seq2seq prefix in the three-prefix form (codec.py): the lengths of its encoder and
    # cross-attention parts, stored in the same file as the kv; 0 = no such part (and
    # records stored before these fields existed).
    encoder_tokens: int = 0
    cross_tokens: int = 0

    @property
    def ref(self) -> PrefixRef:
        return PrefixRef(tenant=self.tenant, prefix_id=self.prefix_id, version=self.version)

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.num_kv_heads, self.num_virtual_tokens, self.head_dim)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "PrefixRecord":
        data = json.loads(text)
        names = {f.name for f in fields(cls)}
        missing = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING} - data.keys()
        if missing:
            raise ValueError(f"prefix record lacks fields {sorted(missing)}")
        # unknown fields are ignored so that a newer writer does not break an older reader
        values = {name: data[name] for name in names if name in data}
        if values.get("trained_after") is not None:
            values["trained_after"] = tuple(PrefixRef(**ref) for ref in values["trained_after"])
        copies = values.get("serving_copies")
        if copies is not None and not (isinstance(copies, dict)
                                       and all(isinstance(k, str) and isinstance(v, str) for k, v in copies.items())):
            raise ValueError(f"prefix record has serving_copies {copies!r}; expected an object of dtype -> version")
        values["serving_copies"] = dict(copies or {})
        return cls(**values)


EventKind = Literal["put", "delete"]


@dataclass(frozen=True)
class PrefixEvent:
    """Published on every change; replicas drop cached copies whose version differs."""

    kind: EventKind
    tenant: str
    prefix_id: str
    version: str  # the version written ("put") or removed ("delete")

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "PrefixEvent":
        data = json.loads(text)
        if data.get("kind") not in ("put", "delete"):
            raise ValueError(f"unknown prefix event kind {data.get('kind')!r}")
        return cls(kind=data["kind"], tenant=data["tenant"], prefix_id=data["prefix_id"],
                   version=data["version"])


TenantEventKind = Literal["deleted", "key_rotated"]


@dataclass(frozen=True)
class TenantEvent:
    """Published when a tenant's key stops working (the tenant was deleted, or its key
    rotated); replicas forget the keys they remember for it (server/api/auth.py)."""

    kind: TenantEventKind
    tenant: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "TenantEvent":
        data = json.loads(text)
        if data.get("kind") not in ("deleted", "key_rotated"):
            raise ValueError(f"unknown tenant event kind {data.get('kind')!r}")
        if not isinstance(data.get("tenant"), str):
            raise ValueError("tenant event without a tenant")
        return cls(kind=data["kind"], tenant=data["tenant"])
