"""What a personalization job trains: built by the API route, stored with the job in the
queue (as JSON), read by the worker. One type, so the two sides cannot drift apart."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from server.training.data import Example


@dataclass(frozen=True)
class BasePrefix:
    """The task prefix a user prefix is trained after (composed first when served)."""

    name: str  # as the client wrote it (e.g. "shared/support")
    tenant: str  # its owner
    prefix_id: str


@dataclass(frozen=True)
class JobSpec:
    examples: tuple[Example, ...]
    num_virtual_tokens: int  # length of the user's prefix
    steps: int  # optimizer steps
    learning_rate: float  # peak AdamW learning rate, decayed linearly to 0
    model_fingerprint: str  # the weights of the server that queued it: the worker must run the same
    init_text: str | None = None  # real words the prefix starts from (None: the first example)
    seed: int = 0
    base_prefix: BasePrefix | None = None
    tenant_incarnation: str | None = None  # the worker publishes only into this life of the tenant

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "JobSpec":
        """Raises ValueError naming what is missing or malformed."""
        try:
            base = data.get("base_prefix")
            return cls(examples=tuple(Example(e["prompt"], e["completion"]) for e in data["examples"]),
                       num_virtual_tokens=int(data["num_virtual_tokens"]), steps=int(data["steps"]),
                       learning_rate=float(data["learning_rate"]), model_fingerprint=str(data["model_fingerprint"]),
                       init_text=data.get("init_text"), seed=int(data.get("seed") or 0),
                       base_prefix=BasePrefix(**base) if base else None,
                       tenant_incarnation=data.get("tenant_incarnation"))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed job spec ({type(e).__name__}: {e})") from e
