"""Iteration-level (continuous) batching: which tokens of which requests run this step, and
each request's state after the step.

# NOTE: invariants
# - A step holds at most max_num_batched_tokens tokens and max_num_seqs requests. Running
#   requests are served first (oldest first): one decode token each, or the next chunk of
#   a prompt that did not fit in one step (chunked prefill). Waiting requests are admitted
#   in FIFO order with what budget is left; prefill and decode share the step.
# - Before a request runs, its prefix is resident (its user count includes it) and its own
#   segment has blocks for every token it computes this step. Blocks come from the
#   KVCacheManager only.
# - When the pool is out of blocks: unused prefixes are evicted first (LRU, inside the KV
#   manager); then the youngest running request is preempted: its own blocks are freed,
#   its prefix released, and it goes back to the front of the waiting queue to be
#   recomputed from its prompt and the tokens it already produced. The oldest request
#   always makes progress, and a request that cannot fit even alone is refused at add
#   time, so nothing deadlocks.
# - No admission in a step that preempted: the pool is under pressure.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from server.engine.config import EngineConfig
from server.engine.kv_cache_manager import KVCacheManager
from server.engine.outputs import FinishReason
from server.engine.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    scheduled: list[Request] = field(default_factory=list)  # in packing order
    num_new_tokens: list[int] = field(default_factory=list)  # per scheduled request (its q_len)
    preempted: list[Request] = field(default_factory=list)  # went back to waiting this step


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # oldest admitted first
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def add_running(self, request: Request) -> None:
        """A request that holds its blocks already (a sample forked from a running one)."""
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self._grow(req, req.num_computed_tokens + num_new, out):
                break  # req itself was preempted: it was the youngest
            out.scheduled.append(req)
            out.num_new_tokens.append(num_new)
            budget -= num_new
            i += 1
        if not out.preempted:
            self._admit(out, budget)
        return out

    def postprocess(self, out: SchedulerOutput, sampled: list[Request], tokens: list[int],
                    eos_token_ids: set[int], now: float) -> None:
        """The state after a step: every scheduled request has its new tokens computed; each
        sampled request gets its token and finishes on EOS (unless ignored) or max_tokens."""
        for req, q in zip(out.scheduled, out.num_new_tokens):
            req.num_computed_tokens += q
        for req, token in zip(sampled, tokens):
            if req.sampling.max_tokens == 0:  # scoring the prompt only: done once it is computed
                self.finish(req, FinishReason.LENGTH)
                continue
            req.output_token_ids.append(token)
            if req.first_token_time is None:
                req.first_token_time = now
            if token in eos_token_ids and not req.sampling.ignore_eos:
                self.finish(req, FinishReason.STOP)
            elif len(req.output_token_ids) >= req.sampling.max_tokens:
                self.finish(req, FinishReason.LENGTH)

    def finish(self, req: Request, reason: FinishReason) -> None:
        """Free everything `req` holds, whether running or waiting (finish, abort, error)."""
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
            self.kv.free(req)
        elif req.status == RequestStatus.WAITING:
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason

    # ---- internals

    def _grow(self, req: Request, num_tokens: int, out: SchedulerOutput) -> bool:
        """Give req's own segment room for num_tokens, preempting younger requests if needed."""
        while not self.kv.allocate(req, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is req:
                return False
        return True

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            num_new = min(req.num_tokens, budget)
            if not self.kv.acquire_prefix(req):
                return  # wait until running requests free blocks (FIFO: no overtaking)
            if not self.kv.allocate(req, num_new):
                self.kv.free(req)
                return
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(req)
            out.num_new_tokens.append(num_new)
            budget -= num_new

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
