"""One generation request as the engine tracks it, and the check a request passes before it is
accepted (against the engine's limits, also on the API side of an engine process)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from server.engine.block_pool import blocks_for
from server.engine.outputs import FinishReason, TokenLogprob
from server.engine.sampling_params import SamplingParams
from server.prefix import ModelKind, ModelSpec, Prefix, PrefixError


class RequestError(ValueError):
    """A request the engine can never run (empty prompt, a token outside the vocabulary,
    longer than the context or the pool); the message names the numbers."""


@dataclass(frozen=True)
class EngineLimits:
    """What a request is checked against before it reaches the engine (the engine's, or an
    engine process's, sent to the API at start-up)."""

    spec: ModelSpec
    vocab_size: int
    num_blocks: int  # KV pool
    block_size: int
    has_tokenizer: bool
    max_num_seqs: int = 0  # requests running at once (0: unknown); admission counts only what waits beyond it


def check_request(limits: EngineLimits, prompt_token_ids: list[int], sampling: SamplingParams,
                  prefix: Prefix | None) -> None:
    """Raise RequestError (PrefixError for a prefix made for another model) naming the numbers
    if the request can never run. Pure: changes nothing."""
    if not isinstance(sampling, SamplingParams):
        raise TypeError(f"sampling must be SamplingParams, got {type(sampling).__name__}")
    if not prompt_token_ids:
        raise RequestError("the prompt is empty: at least one token is needed")
    spec = limits.spec
    if prefix is not None and prefix.spec != spec:
        raise PrefixError(f"the prefix was checked against another model (fingerprint {prefix.spec.fingerprint}, "
                          f"{prefix.spec.num_layers} layers); this engine runs {spec.fingerprint}: make it with "
                          "this engine's make_prefix")
    if sampling.stop and not limits.has_tokenizer:
        raise RequestError("stop strings need a tokenizer; this engine has none")
    if sampling.guided_regex is not None and not limits.has_tokenizer:
        raise RequestError("structured output needs a tokenizer; this engine has none")
    p = prefix.length if prefix is not None else 0
    if spec.kind is ModelKind.SEQ2SEQ_LM:
        _check_seq2seq(limits, prompt_token_ids, sampling, p)
        return
    n, limit = len(prompt_token_ids), spec.max_model_len
    room = 1 if sampling.max_tokens else 0  # scoring only (max_tokens 0) may fill the context
    if p + n + room > limit:
        raise RequestError(f"prompt of {n} tokens after a prefix of {p} does not fit the context of "
                           f"{limit} tokens (at most {limit - p - room} prompt tokens)")
    if p + n + sampling.max_tokens > limit:
        raise RequestError(f"prefix {p} + prompt {n} + max_tokens {sampling.max_tokens} = "
                           f"{p + n + sampling.max_tokens} exceeds the context of {limit} tokens; "
                           f"use max_tokens <= {limit - p - n}")
    _check_vocab(limits, prompt_token_ids)  # after the length checks: a huge prompt is refused in O(1)
    need = blocks_for(p, limits.block_size) + blocks_for(n + sampling.max_tokens, limits.block_size)
    if need > limits.num_blocks:
        raise RequestError(f"request needs {need} KV blocks of {limits.block_size} tokens; the pool has "
                           f"{limits.num_blocks}")


def _check_vocab(limits: EngineLimits, prompt_token_ids: list[int]) -> None:
    vocab = limits.vocab_size
    bad = [t for t in prompt_token_ids if not 0 <= int(t) < vocab]
    if bad:
        raise RequestError(f"prompt has token id {bad[0]} outside the vocabulary [0, {vocab})")


def _check_seq2seq(limits: EngineLimits, prompt_token_ids: list[int], sampling: SamplingParams, p: int) -> None:
    """An encoder-decoder request (server/engine/seq2seq_core.py): the prompt is the encoder's
    input, the prefix and the generated tokens take decoder positions, and the request holds
    len(prompt) + prefix + max_tokens token slots of the budget (`num_blocks`, blocks of one)."""
    n, limit = len(prompt_token_ids), limits.spec.max_model_len
    if n > limit:
        raise RequestError(f"prompt of {n} tokens is longer than the encoder's {limit} positions")
    if sampling.max_tokens < 1:
        raise RequestError("an encoder-decoder model generates: max_tokens must be at least 1 "
                           "(prompt scoring is for causal models)")
    if p + sampling.max_tokens > limit:
        raise RequestError(f"prefix {p} + max_tokens {sampling.max_tokens} = {p + sampling.max_tokens} exceeds the "
                           f"decoder's {limit} positions; use max_tokens <= {limit - p}")
    _check_vocab(limits, prompt_token_ids)
    need = n + p + sampling.max_tokens
    if need > limits.num_blocks:
        raise RequestError(f"request needs {need} token slots (prompt {n} + prefix {p} + max_tokens "
                           f"{sampling.max_tokens}); the engine holds {limits.num_blocks}")
    if sampling.prompt_logprobs is not None:
        raise RequestError("prompt_logprobs: not supported for encoder-decoder models yet (the prompt is the "
                           "encoder's input, which has no next-token logits)")


class RequestStatus(Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to be recomputed
    RUNNING = "running"  # holds blocks in the KV pool
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    prefix: Prefix | None = None  # already composed; None = base model
    arrival_time: float = field(default_factory=time.monotonic)
    tenant: str = ""  # whose request: the scheduler shares the batch fairly between tenants

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    # Own tokens (prompt + output) whose k/v are in the pool. Reset to 0 on preemption:
    # the request is then recomputed from its prompt and the tokens it already produced.
    num_computed_tokens: int = 0
    own_blocks: list[int] = field(default_factory=list)  # block table of the own segment
    prefix_blocks: list[int] = field(default_factory=list)  # shared, owned by the prefix cache
    finish_reason: FinishReason | None = None
    error: str | None = None  # set with FinishReason.ERROR
    output_text: str = ""  # detokenized output, stop strings cut off
    num_text_emitted: int = 0  # characters of output_text already sent
    num_tokens_emitted: int = 0  # tokens already sent
    detok_prefix_offset: int = 0  # incremental detokenization window (see detokenizer.py)
    detok_read_offset: int = 0  # output tokens already detokenized
    detok_stream: object | None = None  # the fast tokenizer's DecodeStream of this request
    first_token_time: float | None = None
    num_preemptions: int = 0
    index: int = 0  # which of the n samples of request_id
    # n > 1: the other samples, forked from this one when its prompt is computed (they then
    # share its blocks); empty once forked
    forks: list[Request] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of output_token_ids (sampling.logprobs)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=lambda: [None])  # token 0 has none
    cumulative_logprob: float = 0.0
    num_logprobs_emitted: int = 0
    prompt_logprobs_sent: bool = False
    guide: object | None = None  # outlines_core.Guide: where the text is in sampling.guided_regex

    @property
    def prefix_len(self) -> int:
        return self.prefix.length if self.prefix is not None else 0

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED
