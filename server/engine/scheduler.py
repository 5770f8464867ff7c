"""Iteration-level (continuous) batching across tenants: which tokens of which requests run
this step, and each request's state after the step.

# NOTE: invariants
# - A step holds at most max_num_batched_tokens tokens and max_num_seqs requests. Running
#   requests that decode get one token each first (oldest first). What is left is the
#   step's prefill budget, split between the tenants with prefill work (running prompts
#   that did not fit in one step, and waiting requests) max-min fairly (fairness.py), so
#   one tenant's long prompt never takes a whole step while another tenant waits.
# - A prefill chunk is also cut so that its attention stays within prefill_attention_budget
#   (new tokens x the keys they attend to, summed over the step; split between tenants the
#   same way): a step over a long context stays short, so every other request keeps
#   getting a step (prefill or decode) every fraction of a second. A chunk has at least
#   one token, so every prompt makes progress.
# - Waiting requests are admitted by tenant: a tenant below its share of max_num_seqs first,
#   then the tenant with the smallest virtual token counter (VTC), FIFO within a tenant.
#   Every scheduled token is charged to its tenant's counter.
# - When the batch is full and a tenant with waiting requests runs fewer than its share
#   (max_num_seqs / tenants with work), the youngest requests of the tenant furthest above
#   its share are preempted for it: a backlog of one tenant never holds every slot.
# - Before a request runs, its prefix is resident (its user count includes it) and its own
#   segment has blocks for every token it computes this step. Blocks come from the
#   KVCacheManager only.
# - When the pool is out of blocks: unused prefixes are evicted first (LRU, inside the KV
#   manager); then the youngest running request is preempted: its own blocks are freed,
#   its prefix released, and it goes back to the front of its tenant's queue to be
#   recomputed from its prompt and the tokens it already produced. The oldest request
#   always makes progress, and a request that cannot fit even alone is refused at add
#   time, so nothing deadlocks.
# - No admission in a step that preempted for blocks: the pool is under pressure. An
#   admission that does not find room for its prefix or its first chunk stops admission
#   for the step (no overtaking, so a large request is not starved by small ones).
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from server.engine.config import EngineConfig
from server.engine.fairness import VirtualTokenCounter, fair_shares
from server.engine.kv_cache_manager import KVCacheManager
from server.engine.outputs import FinishReason
from server.engine.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    scheduled: list[Request] = field(default_factory=list)  # in packing order
    num_new_tokens: list[int] = field(default_factory=list)  # per scheduled request (its q_len)
    preempted: list[Request] = field(default_factory=list)  # went back to waiting this step


class WaitingQueues:
    """Waiting requests, one FIFO per tenant (a preempted request goes back to the front)."""

    def __init__(self) -> None:
        self._queues: dict[str, deque[Request]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Request]:
        for queue in self._queues.values():
            yield from queue

    def tenants(self) -> list[str]:
        """Tenants with at least one waiting request."""
        return list(self._queues)

    def of(self, tenant: str) -> deque[Request]:
        return self._queues.get(tenant, deque())

    def count(self, tenant: str) -> int:
        return len(self._queues.get(tenant, ()))

    def append(self, req: Request) -> None:
        self._queues.setdefault(req.tenant, deque()).append(req)
        self._count += 1

    def appendleft(self, req: Request) -> None:
        self._queues.setdefault(req.tenant, deque()).appendleft(req)
        self._count += 1

    def remove(self, req: Request) -> None:
        queue = self._queues[req.tenant]
        queue.remove(req)
        self._count -= 1
        if not queue:
            del self._queues[req.tenant]

    def popleft(self, tenant: str) -> Request:
        queue = self._queues[tenant]
        req = queue.popleft()
        self._count -= 1
        if not queue:
            del self._queues[tenant]
        return req


def attention_pairs(req: Request, num_new: int) -> int:
    """Query x key pairs of a prefill chunk of `num_new` tokens (each attends to the prefix,
    the tokens computed before it, and itself)."""
    return num_new * (req.prefix_len + req.num_computed_tokens + num_new)


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting = WaitingQueues()
        self.running: list[Request] = []  # oldest admitted first
        self.vtc = VirtualTokenCounter()
        self.num_running_of: Counter[str] = Counter()  # tenant -> running requests (no zeros)
        self.num_preemptions = 0
        self.kv_reserve = int(kv.num_blocks * config.kv_reserve_fraction)  # blocks (_admit)

    def add(self, request: Request) -> None:
        tenant = request.tenant
        if not self.waiting.count(tenant) and not self.num_running_of[tenant]:
            self.vtc.join(tenant, self._backlogged())
        self.waiting.append(request)

    def add_running(self, request: Request) -> None:
        """A request that holds its blocks already (a sample forked from a running one)."""
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        self.num_running_of[request.tenant] += 1  # as for any running request: _stop_running takes it off

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._share_slots(out)
        num_fair_preemptions = len(out.preempted)
        tokens = self.config.max_num_batched_tokens
        plan: dict[Request, int] = {}
        for req in self.running:  # decodes: one token each, oldest first
            if tokens > 0 and req.num_tokens - req.num_computed_tokens == 1:
                plan[req] = 1
                tokens -= 1
        prefilling = [r for r in self.running if r.num_tokens - r.num_computed_tokens > 1]
        token_share, pair_share = self._prefill_shares(prefilling, tokens, plan)
        for req in prefilling:  # the running prompts' next chunks, within their tenant's share
            num_new = self._chunk(req, token_share, pair_share)
            if num_new:
                plan[req] = num_new
        for req in list(self.running):  # oldest first: a request short of blocks preempts the youngest
            num_new = plan.get(req, 0)
            if num_new == 0 or req.status != RequestStatus.RUNNING:
                continue  # nothing to do this step, or preempted by an older request just now
            if not self._grow(req, req.num_computed_tokens + num_new, out):
                break  # req itself was preempted: it was the youngest
            self._schedule(out, req, num_new)
        if len(out.preempted) == num_fair_preemptions:
            self._admit(out, token_share, pair_share)
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
            self._stop_running(req)
            self.kv.free(req)
        elif req.status == RequestStatus.WAITING:
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason

    def waiting_by_tenant(self) -> dict[str, int]:
        return {t: self.waiting.count(t) for t in self.waiting.tenants()}

    # ---- internals

    def _backlogged(self) -> set[str]:
        return set(self.waiting.tenants()) | set(self.num_running_of)

    def _slot_share(self) -> int:
        return self.config.max_num_seqs // max(1, len(self._backlogged()))

    def _share_slots(self, out: SchedulerOutput) -> None:
        """When the batch is full, free one slot for each tenant that waits while running
        fewer than its share of the batch: the youngest request of the tenant furthest above
        its share goes back to waiting. (Slots freed by finishing requests go to tenants below
        their share first, so this is needed only while nothing finishes.)"""
        if len(self.running) < self.config.max_num_seqs or not self.waiting:
            return
        share = self._slot_share()
        prefilling = {r.tenant for r in self.running if r.num_tokens - r.num_computed_tokens > 1}
        # a tenant with a prompt in progress can use its prefill share there: it lacks no slot
        wanted = sum(1 for t in self.waiting.tenants() if self.num_running_of[t] < share and t not in prefilling)
        for _ in range(wanted):
            over = max(self.num_running_of, key=self.num_running_of.__getitem__)  # the most running
            if self.num_running_of[over] <= share:
                return
            victim = next(r for r in reversed(self.running) if r.tenant == over)  # its youngest
            self._preempt(victim)
            out.preempted.append(victim)

    def _prefill_shares(self, prefilling: list[Request], tokens: int,
                        decodes: dict[Request, int]) -> tuple[dict[str, int], dict[str, int]]:
        """Each tenant's share of the step's prefill tokens and attention pairs, for what its
        running prompts and (if a slot is free) its waiting requests need. Tokens go to the
        least served tenants first (VTC counters, this step's decodes included), equally
        among equals; attention pairs are split max-min fairly."""
        can_admit = len(self.running) < self.config.max_num_seqs
        levels = {t: self.vtc[t] for t in self._backlogged()}
        for req, num_new in decodes.items():
            levels[req.tenant] += num_new
        tenants = sorted(levels, key=levels.__getitem__)
        token_demand, pair_demand = dict.fromkeys(tenants, 0), dict.fromkeys(tenants, 0)
        waiting = [r for r in self.waiting] if can_admit else []
        for req in prefilling + waiting:
            left = req.num_tokens - req.num_computed_tokens
            token_demand[req.tenant] += left
            pair_demand[req.tenant] += attention_pairs(req, left)
        return (fair_shares(token_demand, tokens, levels),
                fair_shares(pair_demand, self.config.prefill_attention_budget))

    def _chunk(self, req: Request, token_share: dict[str, int], pair_share: dict[str, int]) -> int:
        """The next chunk of req's prompt within its tenant's shares (taken from them): as many
        tokens as fit both, at least one if the tenant has a token left."""
        t = req.tenant
        left = min(req.num_tokens - req.num_computed_tokens, token_share.get(t, 0))
        if left <= 0:
            return 0
        ctx = req.prefix_len + req.num_computed_tokens
        pairs = max(0, pair_share.get(t, 0))  # largest n with n * (ctx + n) <= pairs
        num_new = max(1, min(left, int((math.sqrt(ctx * ctx + 4 * pairs) - ctx) / 2)))
        token_share[t] -= num_new
        pair_share[t] = pair_share.get(t, 0) - attention_pairs(req, num_new)
        return num_new

    def _schedule(self, out: SchedulerOutput, req: Request, num_new: int) -> None:
        out.scheduled.append(req)
        out.num_new_tokens.append(num_new)
        self.vtc.charge(req.tenant, num_new)

    def _grow(self, req: Request, num_tokens: int, out: SchedulerOutput) -> bool:
        """Give req's own segment room for num_tokens, preempting younger requests if needed."""
        while not self.kv.allocate(req, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is req:
                return False
        return True

    def _admit(self, out: SchedulerOutput, token_share: dict[str, int], pair_share: dict[str, int]) -> None:
        share = self._slot_share()
        # The pool's last kv_reserve blocks go only to a tenant running fewer requests than
        # its share if one more tenant arrived: one tenant's flood stops short of them, and a
        # newcomer (or a light tenant beside the flood) starts at once instead of waiting for
        # a flooding request to end.
        newcomer_share = self.config.max_num_seqs // (len(self._backlogged()) + 1)
        available, held = self.kv.num_available, set()
        while len(self.running) < self.config.max_num_seqs:
            tenants = [t for t in self.waiting.tenants() if token_share.get(t, 0) > 0 and t not in held]
            if not tenants:
                return
            # below its share of the batch first, then the least served, then the oldest
            tenant = min(tenants, key=lambda t: (self.num_running_of[t] >= share, self.vtc[t],
                                                 self.waiting.of(t)[0].arrival_time))
            req = self.waiting.of(tenant)[0]
            saved = token_share[tenant], pair_share[tenant]
            num_new = self._chunk(req, token_share, pair_share)
            takes = self.kv.blocks_to_start(req, num_new)
            if self.num_running_of[tenant] >= max(1, newcomer_share) and available - takes < self.kv_reserve:
                token_share[tenant], pair_share[tenant] = saved
                held.add(tenant)  # the reserve is not for it; a tenant below the line may use it
                continue
            if not self.kv.acquire_prefix(req):
                token_share[tenant], pair_share[tenant] = saved
                return  # wait until running requests free blocks (no overtaking)
            if not self.kv.allocate(req, num_new):
                self.kv.free(req)
                token_share[tenant], pair_share[tenant] = saved
                return
            available -= takes
            self.waiting.popleft(tenant)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self.num_running_of[tenant] += 1
            self._schedule(out, req, num_new)

    def _stop_running(self, req: Request) -> None:
        self.running.remove(req)
        self.num_running_of[req.tenant] -= 1
        if not self.num_running_of[req.tenant]:
            del self.num_running_of[req.tenant]

    def _preempt(self, req: Request) -> None:
        self.waiting.appendleft(req)  # before it stops running: its tenant stays backlogged
        self._stop_running(req)
        self.kv.free(req)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
