"""The scheduler's promises (its NOTE), on tiny objects and no model: the token budget and
chunked prefill, preemption of the youngest request first, no admission in a step that
preempted, and FIFO admission that waits for blocks instead of overtaking."""

from __future__ import annotations

import torch

from server.engine.config import EngineConfig
from server.engine.kv_cache_manager import KVCacheManager
from server.engine.outputs import FinishReason
from server.engine.request import Request, RequestStatus
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import Scheduler
from server.prefix import ModelSpec, Prefix, PrefixRef

BLOCK = 4
SPEC = ModelSpec(num_layers=1, num_kv_heads=1, head_dim=2, fingerprint="test", max_model_len=1024)


def make_scheduler(num_blocks: int = 16, budget: int = 32, max_seqs: int = 8) -> Scheduler:
    config = EngineConfig(block_size=BLOCK, num_blocks=num_blocks, max_num_batched_tokens=budget, max_num_seqs=max_seqs)
    return Scheduler(config, KVCacheManager(num_blocks, BLOCK, write_prefix=lambda blocks, kv: None))


def make_request(rid: str, prompt_len: int, prefix_len: int = 0) -> Request:
    prefix = None
    if prefix_len:
        prefix = Prefix(kv=torch.zeros(1, 2, 1, prefix_len, 2), spec=SPEC, refs=(PrefixRef("t", rid, "v"),))
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=64), prefix)


def step(s: Scheduler, sampled_token: int = 7) -> list[tuple[str, int]]:
    """Schedule, then act as if the step ran: every request that reached its end samples."""
    out = s.schedule()
    sampled = [r for r, q in zip(out.scheduled, out.num_new_tokens) if r.num_computed_tokens + q == r.num_tokens]
    s.postprocess(out, sampled, [sampled_token] * len(sampled), eos_token_ids=set(), now=0.0)
    return [(r.request_id, q) for r, q in zip(out.scheduled, out.num_new_tokens)]


def test_the_token_budget_chunks_long_prompts_and_decodes_go_first():
    s = make_scheduler(budget=10)
    for r in (make_request("a", 7), make_request("b", 12), make_request("c", 3)):
        s.add(r)
    assert step(s) == [("a", 7), ("b", 3)]  # b's prompt is chunked to the 3 tokens left
    assert step(s) == [("a", 1), ("b", 9)]  # a decodes first (oldest), b takes the rest
    assert step(s) == [("a", 1), ("b", 1), ("c", 3)]  # b's last chunk sampled; c admitted
    assert all(sum(q for _, q in step(s)) <= 10 for _ in range(5))


def test_max_num_seqs_bounds_the_running_set():
    s = make_scheduler(max_seqs=2)
    for rid in "abc":
        s.add(make_request(rid, 2))
    assert [rid for rid, _ in step(s)] == ["a", "b"]
    assert [r.request_id for r in s.waiting] == ["c"]


def test_out_of_blocks_preempts_the_youngest_and_admits_nothing_that_step():
    s = make_scheduler(num_blocks=6, budget=64)
    a, b, c = make_request("a", 8), make_request("b", 8), make_request("c", 4)  # 2 + 2 blocks, then 1
    for r in (a, b, c):
        s.add(r)
    assert step(s) == [("a", 8), ("b", 8), ("c", 4)]  # 5 blocks of 6 in use
    # a and b each cross into a new block at their 9th token: one block is free, so a gets
    # it, and b needs the youngest running request (c) to go.
    out = s.schedule()
    assert [r.request_id for r in out.scheduled] == ["a", "b"]
    assert [r.request_id for r in out.preempted] == ["c"]
    assert c.status == RequestStatus.WAITING and c.num_computed_tokens == 0 and c.own_blocks == []
    assert list(s.waiting) == [c]  # back at the front, to be recomputed
    assert c.num_preemptions == 1 and s.num_preemptions == 1
    s.postprocess(out, [], [], set(), 0.0)
    out = s.schedule()  # no room yet: c stays waiting, nothing was admitted on top
    assert c not in out.scheduled and list(s.waiting) == [c]


def test_a_request_preempts_itself_when_it_is_the_youngest():
    s = make_scheduler(num_blocks=4, budget=64)
    a, b = make_request("a", 7), make_request("b", 8)
    s.add(a)
    s.add(b)
    assert step(s) == [("a", 7), ("b", 8)]  # all 4 blocks; a's second block has room for one more
    out = s.schedule()  # a fits its next token; b needs a block, and the youngest running is b itself
    assert [r.request_id for r in out.scheduled] == ["a"] and out.preempted == [b]
    assert b.status == RequestStatus.WAITING and s.kv.num_free == 2


def test_admission_is_fifo_and_waits_for_room_for_the_prefix():
    s = make_scheduler(num_blocks=4, budget=64)
    first, big, small = make_request("first", 8), make_request("big", 2, prefix_len=12), make_request("small", 2)
    for r in (first, big, small):
        s.add(r)
    assert step(s) == [("first", 8)]  # big's prefix (3 blocks) does not fit: small does not overtake
    assert [r.request_id for r in s.waiting] == ["big", "small"] and big.prefix_blocks == []
    s.finish(first, FinishReason.STOP)
    assert s.kv.num_free == 4
    assert step(s) == [("big", 2)]  # its prefix (3 blocks) and its own block: small still waits
    assert big.status == RequestStatus.RUNNING and len(big.prefix_blocks) == 3
    assert [r.request_id for r in s.waiting] == ["small"]


def test_finishing_gives_every_block_back():
    s = make_scheduler(num_blocks=8)
    reqs = [make_request(f"r{i}", 5, prefix_len=4 * (i % 2)) for i in range(3)]
    for r in reqs:
        s.add(r)
    step(s)
    for r in reqs:
        s.finish(r, FinishReason.ABORT)
    assert s.kv.num_free + s.kv.prefixes.num_blocks == 8
    assert all(e.users == 0 for e in map(s.kv.prefixes.get, s.kv.prefixes.lru_keys()))
    assert not s.has_unfinished()
