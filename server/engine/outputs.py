"""What the engine hands back: per-request deltas each step, and a stats snapshot."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class FinishReason(str, Enum):
    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # aborted by the caller (e.g. client disconnected)
    ERROR = "error"  # this request failed inside the step; the others went on (see `error`)


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model (float32 log_softmax of the raw logits:
    before temperature, top-k or top-p), with the `top` most likely tokens at that position
    (most likely first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]  # tokens produced since the last output
    new_text: str  # text produced since the last output (stop strings cut off)
    finished: bool  # this sample is finished (a request with n samples ends when all n are)
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # total so far
    first_token_time: float | None = None  # time.monotonic() of the first output token
    arrival_time: float = 0.0
    error: str | None = None  # why the request failed (finish_reason ERROR)
    index: int = 0  # which of the request's n samples
    logprobs: list[TokenLogprob] | None = None  # of new_token_ids, when sampling.logprobs is set
    # Of the prompt's tokens when sampling.prompt_logprobs is set: None for the first token
    # (nothing predicts it), then one per token. Sent once, in sample 0's first output.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    cumulative_logprob: float | None = None  # sum over all output tokens so far (with logprobs)


@dataclass
class EngineStats:
    """A snapshot for metrics and /ready; plain numbers, no Prometheus here."""

    num_running: int = 0
    num_waiting: int = 0
    waiting_by_tenant: dict[str, int] = field(default_factory=dict)  # tenants with waiting requests
    kv_blocks_total: int = 0
    kv_blocks_free: int = 0
    kv_blocks_used_by_prefixes: int = 0
    prefixes_resident: int = 0  # prefixes with blocks in the pool
    prefixes_resident_bytes: int = 0
    prefix_hits: int = 0  # cumulative: a request found its prefix resident
    prefix_misses: int = 0  # cumulative: the prefix was copied into the pool
    prefix_evictions: int = 0  # cumulative
    preemptions: int = 0  # cumulative
    steps: int = 0  # cumulative
    prompt_tokens: int = 0  # cumulative, prefill tokens computed (recompute included)
    generated_tokens: int = 0  # cumulative
    last_step_tokens: int = 0
    last_step_requests: int = 0
    scheduled_tokens: int = 0  # cumulative tokens over all steps (tokens/step = this / steps)
    scheduled_requests: int = 0  # cumulative requests over all steps
