"""Per-request sampling settings, checked when the request is made.

# NOTE: every bound here is one the sampler can honour for any value inside it, so a
# request that passes these checks cannot fail inside the step loop: a seed stays a valid
# 64-bit generator seed after the per-token mixing (sampler.token_seed), and a temperature
# is 0 (greedy) or large enough that logits / temperature stays finite in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit value
MIN_TEMPERATURE = 1e-3  # below this (and above 0) logits / temperature can overflow float32
MAX_TEMPERATURE = 100.0
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_LOGPROBS = 20  # top tokens reported per position
MAX_SAMPLES = 64  # n
MAX_REGEX_CHARS = 65_536  # a guided request's pattern (server/engine/guided_decoding.py)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy (argmax), deterministic
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens with this much mass
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None  # same seed, same prompt, same prefix -> same tokens
    stop: tuple[str, ...] = field(default_factory=tuple)  # stop strings (not in the output)
    ignore_eos: bool = False  # keep going past EOS (benchmarks)
    n: int = 1  # samples of this prompt; they share the prefix's and the prompt's KV blocks
    logprobs: int | None = None  # report each output token's logprob and this many top tokens
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (scoring)
    guided_regex: str | None = None  # structured output: the text must match this (guided_decoding.py)

    def __post_init__(self) -> None:
        if isinstance(self.stop, (list, str)):
            object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        if not _is_int(self.max_tokens) or self.max_tokens < 0:
            raise ValueError(f"max_tokens must be a non-negative integer, got {self.max_tokens!r}")
        if self.max_tokens == 0 and self.prompt_logprobs is None:
            raise ValueError("max_tokens 0 only scores the prompt: it needs prompt_logprobs")
        if not _is_int(self.n) or not 1 <= self.n <= MAX_SAMPLES:
            raise ValueError(f"n must be an integer from 1 to {MAX_SAMPLES}, got {self.n!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer from 0 to {MAX_LOGPROBS}, got {value!r}")
        t = self.temperature
        if not _is_real(t) or not (t == 0.0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):
            raise ValueError(f"temperature must be 0 (greedy) or between {MIN_TEMPERATURE:g} and "
                             f"{MAX_TEMPERATURE:g}, got {t!r}")
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be 0 (off) or a positive integer, got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise ValueError(f"seed must be an integer from 0 to {MAX_SEED} (2^63 - 1), got {self.seed!r}")
        if self.guided_regex is not None and (not isinstance(self.guided_regex, str) or not self.guided_regex
                                              or len(self.guided_regex) > MAX_REGEX_CHARS):
            raise ValueError(f"guided_regex must be a non-empty pattern of at most {MAX_REGEX_CHARS} characters")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"{len(self.stop)} stop strings; at most {MAX_STOP_STRINGS} are allowed")
        for s in self.stop:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS:
                raise ValueError(f"stop strings must be non-empty text of at most {MAX_STOP_CHARS} characters")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
