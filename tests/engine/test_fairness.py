"""Fair scheduling across tenants, counted in tokens and steps (never time), on the scheduler
with tiny objects and no model: the virtual token counter (VTC), max-min shares of a step's
prefill budget, a light tenant's admission while a heavy one's backlog fills the batch, and
long prompts chunked so that other tenants' requests run every step."""

from __future__ import annotations

from collections import Counter

from server.engine.config import EngineConfig
from server.engine.fairness import VirtualTokenCounter, fair_shares
from server.engine.kv_cache_manager import KVCacheManager
from server.engine.request import Request, RequestStatus
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import Scheduler

BLOCK = 16


def make_scheduler(num_blocks: int = 4096, budget: int = 256, max_seqs: int = 16,
                   attention_budget: int = 1 << 30, kv_reserve_fraction: float = 1 / 16) -> Scheduler:
    config = EngineConfig(block_size=BLOCK, num_blocks=num_blocks, max_num_batched_tokens=budget,
                          max_num_seqs=max_seqs, prefill_attention_budget=attention_budget,
                          kv_reserve_fraction=kv_reserve_fraction)
    return Scheduler(config, KVCacheManager(num_blocks, BLOCK, write_prefix=lambda blocks, kv: None))


def make_request(rid: str, tenant: str, prompt_len: int, max_tokens: int) -> Request:
    return Request(rid, [5] * prompt_len, SamplingParams(max_tokens=max_tokens, ignore_eos=True), tenant=tenant)


def step(s: Scheduler) -> list[tuple[Request, int]]:
    """Schedule, then act as if the step ran: every request that reached its end samples."""
    out = s.schedule()
    sampled = [r for r, q in zip(out.scheduled, out.num_new_tokens) if r.num_computed_tokens + q == r.num_tokens]
    s.postprocess(out, sampled, [7] * len(sampled), eos_token_ids=set(), now=0.0)
    return list(zip(out.scheduled, out.num_new_tokens))


# ---- the pieces

def test_fair_shares_is_max_min_fair():
    assert fair_shares({"a": 1000, "b": 10}, 100) == {"a": 90, "b": 10}
    assert fair_shares({"a": 1000, "b": 1000, "c": 1000}, 100) == {"a": 34, "b": 33, "c": 33}
    assert fair_shares({"a": 5, "b": 0, "c": 50}, 100) == {"a": 5, "b": 0, "c": 50}
    assert fair_shares({"a": 40, "b": 30, "c": 1000}, 90) == {"a": 30, "b": 30, "c": 30}
    assert fair_shares({}, 10) == {}


def test_a_tenant_that_was_idle_banks_no_credit():
    vtc = VirtualTokenCounter()
    vtc.join("heavy", backlogged=())
    vtc.charge("heavy", 10_000)
    vtc.join("light", backlogged={"heavy"})  # lifted to the least served backlogged tenant
    assert vtc["light"] == 10_000
    vtc.charge("light", 500)
    vtc.join("other", backlogged={"heavy", "light"})
    assert vtc["other"] == 10_000
    vtc.join("heavy", backlogged=())  # nobody had work: history forgotten
    assert vtc["heavy"] == 0 and vtc["light"] == 0


# ---- throughput: backlogged tenants get the same number of tokens

def served_tokens(s: Scheduler, steps: int) -> Counter:
    served: Counter = Counter()
    for _ in range(steps):
        for req, q in step(s):
            served[req.tenant] += q
    return served


def test_backlogged_tenants_get_equal_tokens_whatever_their_request_shapes():
    # Tenant a sends long prompts with short answers, b short prompts with long answers; a's
    # whole backlog arrived first. Served in arrival order (FIFO), a would get nearly
    # every token of the window.
    s = make_scheduler(budget=128, max_seqs=8)
    for i in range(300):
        s.add(make_request(f"a{i}", "a", prompt_len=200, max_tokens=4))
    for i in range(300):
        s.add(make_request(f"b{i}", "b", prompt_len=8, max_tokens=60))
    served = served_tokens(s, 200)
    assert s.waiting.count("a") and s.waiting.count("b")  # both still backlogged at the end
    assert abs(served["a"] - served["b"]) <= 0.1 * max(served.values()), served


def test_three_tenants_with_one_flooding_get_equal_tokens():
    s = make_scheduler(budget=64, max_seqs=6)
    for i in range(300):
        s.add(make_request(f"flood{i}", "flood", prompt_len=20, max_tokens=20))
    for t in ("x", "y"):
        for i in range(30):
            s.add(make_request(f"{t}{i}", t, prompt_len=20, max_tokens=20))
    served = served_tokens(s, 150)
    assert all(s.waiting.count(t) for t in ("flood", "x", "y"))
    assert max(served.values()) - min(served.values()) <= 0.1 * max(served.values()), served


# ---- latency: a light tenant is admitted at once while a heavy one's backlog fills the batch

def test_a_light_request_gets_a_slot_at_once_when_a_heavy_backlog_holds_the_whole_batch():
    s = make_scheduler(budget=512, max_seqs=8)
    for i in range(40):  # 5 batches' worth, all with the same length: they would finish together
        s.add(make_request(f"h{i}", "heavy", prompt_len=16, max_tokens=50))
    for _ in range(3):
        step(s)
    assert len(s.running) == 8 and {r.tenant for r in s.running} == {"heavy"}
    light = make_request("l0", "light", prompt_len=16, max_tokens=4)
    s.add(light)
    first = step(s)  # a heavy request makes room (the youngest), the light one prefills
    assert light in [r for r, _ in first] and light.status == RequestStatus.RUNNING
    assert s.num_preemptions == 1 and len(s.running) == 8
    for _ in range(3):
        step(s)
    assert light.is_finished and s.num_preemptions == 1  # no further churn


def test_slots_are_shared_without_ping_pong_between_two_backlogged_tenants():
    s = make_scheduler(budget=512, max_seqs=8)
    for i in range(40):
        s.add(make_request(f"h{i}", "heavy", prompt_len=16, max_tokens=30))
    step(s)
    for i in range(40):
        s.add(make_request(f"l{i}", "light", prompt_len=16, max_tokens=30))
    for k in range(1, 6):  # light takes a slot a step (the youngest heavy one) up to its share
        step(s)
        assert Counter(r.tenant for r in s.running) == {"heavy": 8 - min(k, 4), "light": min(k, 4)}
    preemptions = s.num_preemptions
    served = served_tokens(s, 100)
    assert abs(served["heavy"] - served["light"]) <= 0.1 * max(served.values()), served
    assert s.num_preemptions == preemptions  # slots change hands when requests finish, not by preemption


def flooded(kv_reserve_fraction: float) -> tuple[Scheduler, Request]:
    """A pool of 20 blocks after one step of a 40-request flood, and a light tenant's request
    just added. Each request holds one block for its life (8 prompt + 4 output tokens <= 16):
    nothing grows, so only admission decides who holds the pool."""
    s = make_scheduler(num_blocks=20, budget=512, max_seqs=32, kv_reserve_fraction=kv_reserve_fraction)
    for i in range(40):
        s.add(make_request(f"h{i}", "flood", prompt_len=8, max_tokens=4))
    step(s)
    light = make_request("l0", "light", prompt_len=8, max_tokens=4)
    s.add(light)
    return s, light


def test_a_flood_that_fills_the_pool_leaves_the_reserve_to_a_newcomer():
    s, light = flooded(0.2)
    # alone, the flood may run up to half the batch (16) before the reserve (4 blocks) stops it
    assert s.kv_reserve == 4 and len(s.running) == 16 and s.kv.num_free == 4
    assert light in [r for r, _ in step(s)]  # started the step it came, taking a reserve block
    assert s.num_preemptions == 0 and s.kv.num_free == 3
    while not light.is_finished:
        step(s)
    step(s)  # the flood's next requests take the blocks freed, down to the line again
    assert len(s.running) == 16 and s.kv.num_free == 4 and s.num_preemptions == 0


def test_without_a_reserve_the_newcomer_waits_for_a_flooding_request_to_end():
    s, light = flooded(0.0)  # what the reserve changes: the flood holds every block
    assert len(s.running) == 20 and s.kv.num_free == 0
    assert light not in [r for r, _ in step(s)]


def test_a_tenant_with_nothing_running_may_use_the_whole_pool():
    # max_num_seqs 1: a newcomer's share would be 0, but a tenant with nothing running is never
    # held by the reserve, so a request as big as the pool still starts
    s = make_scheduler(num_blocks=20, budget=512, max_seqs=1, kv_reserve_fraction=0.2)
    big = make_request("big", "t", prompt_len=20 * BLOCK - 1, max_tokens=2)
    s.add(big)
    assert [r for r, _ in step(s)] == [big] and s.kv.num_free == 0


def test_a_single_tenant_is_never_preempted_for_fairness():
    s = make_scheduler(budget=512, max_seqs=4)
    for i in range(20):
        s.add(make_request(f"r{i}", "only", prompt_len=16, max_tokens=10))
    served_tokens(s, 40)
    assert s.num_preemptions == 0


# ---- prefill shared: a long prompt is chunked so other tenants run every step

def test_a_long_prompt_leaves_room_every_step_for_other_tenants():
    budget, attention = 1024, 1 << 20
    s = make_scheduler(budget=budget, max_seqs=16, attention_budget=attention)
    decoding = make_request("b-decode", "b", prompt_len=10, max_tokens=1000)
    s.add(decoding)
    step(s)
    long = make_request("a-long", "a", prompt_len=8000, max_tokens=1)
    s.add(long)
    steps = 0
    while not long.is_finished:
        scheduled = dict(step(s))
        steps += 1
        assert scheduled.get(decoding) == 1  # b's decode runs every step
        assert sum(scheduled.values()) <= budget
        if not long.is_finished and long in scheduled and scheduled[long] > 1:
            # the chunk fits the attention budget (what was computed before + itself)
            assert scheduled[long] * (long.num_computed_tokens) <= attention
        if steps == 3:  # a 1-token request of b arrives while a's prompt prefills
            short = make_request("b-short", "b", prompt_len=5, max_tokens=1)
            s.add(short)
        if steps == 4:
            assert short.is_finished, "b's short request did not get the very next step"
    assert steps > 8  # 8000 tokens at 1024 a step would take 8 steps: the chunks shrank with the context
    assert long.num_computed_tokens == 8000


def test_two_tenants_prefilling_long_prompts_share_each_step():
    s = make_scheduler(budget=512, max_seqs=4)
    a, b = make_request("a", "a", 4000, 1), make_request("b", "b", 4000, 1)
    s.add(a)
    step(s)  # a alone: the whole budget
    assert a.num_computed_tokens == 512
    s.add(b)
    scheduled = dict(step(s))
    assert scheduled == {a: 256, b: 256}


def test_chunks_shrink_with_context_to_fit_the_attention_budget():
    s = make_scheduler(budget=1024, max_seqs=4, attention_budget=1 << 20)
    long = make_request("a", "a", 8000, 1)
    s.add(long)
    chunks = []
    while not long.is_finished:
        before = long.num_computed_tokens
        q = dict(step(s))[long]
        chunks.append(q)
        assert q * (before + q) <= 1 << 20
    assert chunks[0] == 1024 and chunks[-2] < 200  # long context: small chunks


# ---- the server's queue: a full queue still takes a tenant below its share

def test_a_full_queue_keeps_a_share_for_every_tenant():
    from server.engine.async_engine import queue_share

    assert queue_share({"heavy": 256}, "light", 256) == 128  # light has none: it may queue
    assert queue_share({"heavy": 256}, "heavy", 256) == 256  # alone, heavy may have it all
    assert queue_share({"heavy": 250, "light": 6}, "heavy", 256) == 128
    assert queue_share({"a": 3, "b": 3, "c": 3}, "d", 2) == 1  # at least one each
    assert queue_share({}, "a", 0) == 0  # a queue of none takes none
