"""One generation request as the engine tracks it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from server.engine.outputs import FinishReason
from server.prefix import Prefix
from server.engine.sampling_params import SamplingParams


class RequestError(ValueError):
    """A request the engine can never run (empty prompt, a token outside the vocabulary,
    longer than the context or the pool); the message names the numbers."""


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
    detok_read_offset: int = 0
    first_token_time: float | None = None
    num_preemptions: int = 0

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
