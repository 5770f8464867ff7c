"""Iteration-level (continuous) batching: which tokens of which requests run this step.

# NOTE: invariants
# - A step holds at most max_num_batched_tokens tokens and max_num_seqs requests. Running
#   requests are served first (oldest first): one decode token each, or the next chunk of
#   a prompt that did not fit in one step (chunked prefill). Waiting requests are admitted
#   in FIFO order with what budget is left; prefill and decode share the step.
# - Before a request runs, its prefix is resident (prefix cache, users += 1) and its own
#   segment has blocks for every token it computes this step.
# - When the pool is out of blocks: unused prefixes are evicted first (LRU); then the
#   youngest running request is preempted: its own blocks are freed, its prefix released,
#   and it goes back to the front of the waiting queue to be recomputed from its prompt
#   and the tokens it already produced. The oldest request always makes progress, and a
#   request that cannot fit even alone is refused at add time, so nothing deadlocks.
# - No admission in a step that preempted: the pool is under pressure.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from server.engine.block_pool import BlockPool
from server.engine.config import EngineConfig
from server.engine.prefix_cache import PrefixCache, blocks_for
from server.engine.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    scheduled: list[Request] = field(default_factory=list)  # in packing order
    num_new_tokens: list[int] = field(default_factory=list)  # per scheduled request (q_len)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, config: EngineConfig, pool: BlockPool, prefix_cache: PrefixCache) -> None:
        self.config = config
        self.pool = pool
        self.prefix_cache = prefix_cache
        self.block_size = prefix_cache.block_size
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # oldest admitted first
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

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

    def _grow(self, req: Request, num_tokens: int, out: SchedulerOutput) -> bool:
        """Give req's own segment room for num_tokens, preempting younger requests if needed."""
        need = blocks_for(num_tokens, self.block_size) - len(req.own_blocks)
        while need > 0:
            if self.prefix_cache.make_room(need):
                req.own_blocks += self.pool.allocate(need)
                return True
            victim = self.running[-1]
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is req:
                return False
        return True

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if req.prefix is not None:
                entry = self.prefix_cache.acquire(req.prefix)
                if entry is None:
                    return  # wait until running requests free blocks (FIFO: no overtaking)
                req.prefix_blocks = entry.blocks
            num_new = min(req.num_tokens, budget)
            need = blocks_for(num_new, self.block_size)
            if not self.prefix_cache.make_room(need):
                self.release_prefix(req)
                return
            req.own_blocks = self.pool.allocate(need)
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(req)
            out.num_new_tokens.append(num_new)
            budget -= num_new

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._free(req)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _free(self, req: Request) -> None:
        self.pool.free(req.own_blocks)
        req.own_blocks = []
        self.release_prefix(req)

    def release_prefix(self, req: Request) -> None:
        if req.prefix is not None and req.prefix_blocks:
            self.prefix_cache.release(req.prefix.key)
        req.prefix_blocks = []

    def finish(self, req: Request) -> None:
        """Free everything `req` holds, whether running or waiting (finish and abort)."""
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
            self._free(req)
        elif req.status == RequestStatus.WAITING:
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED
