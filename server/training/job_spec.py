"""What a personalization job trains: built by the API route, stored with the job in the
queue (as JSON), read by the worker. One type, so the two sides cannot drift apart."""

from __future__ import annotations

from dataclasses import dataclass

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
    steps: int | None  # optimizer steps; None = derived from the data (server/training/recipe.py)
    learning_rate: float  # peak AdamW learning rate, decayed linearly to 0
    model_fingerprint: str  # the weights of the server that queued it: the worker must run the same
    init_text: str | None = None  # real words the prefix starts from (None: the first example)
    seed: int = 0
    base_prefix: BasePrefix | None = None
    tenant_incarnation: str | None = None  # the worker publishes only into this life of the tenant
    max_steps: int | None = None  # the server's limit on derived steps (max_train_steps)
    kl_weight: float | None = None  # the knowledge regulariser's weight; None = the recipe's default
    held_out_fraction: float | None = None  # share of examples held out for early stopping; None = default

    def to_dict(self) -> dict:
        return {"examples": [e.to_dict() for e in self.examples], "num_virtual_tokens": self.num_virtual_tokens,
                "steps": self.steps, "learning_rate": self.learning_rate, "model_fingerprint": self.model_fingerprint,
                "init_text": self.init_text, "seed": self.seed,
                "base_prefix": None if self.base_prefix is None else vars(self.base_prefix),
                "tenant_incarnation": self.tenant_incarnation, "max_steps": self.max_steps,
                "kl_weight": self.kl_weight, "held_out_fraction": self.held_out_fraction}

    @classmethod
    def from_dict(cls, data: dict) -> "JobSpec":
        """Raises ValueError naming what is missing or malformed."""
        try:
            base = data.get("base_prefix")

            def optional(name: str, kind):
                return None if data.get(name) is None else kind(data[name])

            return cls(examples=tuple(Example.from_dict(e) for e in data["examples"]),
                       num_virtual_tokens=int(data["num_virtual_tokens"]), steps=optional("steps", int),
                       learning_rate=float(data["learning_rate"]), model_fingerprint=str(data["model_fingerprint"]),
                       init_text=data.get("init_text"), seed=int(data.get("seed") or 0),
                       base_prefix=BasePrefix(**base) if base else None,
                       tenant_incarnation=data.get("tenant_incarnation"), max_steps=optional("max_steps", int),
                       kl_weight=optional("kl_weight", float), held_out_fraction=optional("held_out_fraction", float))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed job spec ({type(e).__name__}: {e})") from e
