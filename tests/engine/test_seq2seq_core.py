"""Seq2SeqCore, the seq2seq_lm engine process's loop, on a tiny random BART and T5 with real
PEFT SEQ_2_SEQ_LM adapters: requests that join between decoder steps get PEFT's greedy
tokens for them alone, an abort frees the request's encoder state at once, a full token
budget queues requests until slots come back, and sampling, EOS, stop and logprobs."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from server.engine.config import EngineConfig
from server.engine.engine_core import Abort, AddRequest, DropStale, PrefixPayload, Stop
from server.engine.outputs import FinishReason
from server.engine.request import RequestError
from server.engine.sampling_params import SamplingParams
from server.engine.seq2seq import PrefixSeq2Seq
from server.engine.seq2seq_core import Seq2SeqCore
from server.prefix import PrefixRef
from tests.engine.test_seq2seq import _ids, _reference_tokens, _setup, tiny_bart, tiny_t5


@pytest.fixture(scope="module", params=["bart", "t5"])
def setup(request, tmp_path_factory):
    base = tiny_bart() if request.param == "bart" else tiny_t5()
    return _setup(base, tmp_path_factory, f"core-{request.param}")


def payload(kv: torch.Tensor | None, name: str) -> PrefixPayload | None:
    if kv is None:
        return None
    ref = PrefixRef("acme", name, "v1")
    return PrefixPayload((ref,), (ref,), kv)


def add(rid: str, ids: list[int], prefix: PrefixPayload | None, max_tokens: int = 6, stream: bool = True,
        **sampling) -> AddRequest:
    return AddRequest(rid, ids, SamplingParams(max_tokens=max_tokens, **sampling), prefix, 0.0, stream)


def run(core: Seq2SeqCore, plan: dict[int, list[AddRequest]], max_steps: int = 100):
    """Step the core, adding plan[k] before step k, until nothing is left; every output by
    request id, and the number of requests in each decoder step."""
    outputs, widths = {}, []
    for k in range(max_steps):
        core.apply(plan.get(k, []))
        if not core.has_unfinished() and k > max(plan):
            break
        batch = core.step()
        assert not batch.rejected, batch.rejected
        for out in batch.outputs:
            outputs.setdefault(out.request_id, []).append(out)
        widths.append(batch.stats.last_step_requests if core.running or batch.outputs else 0)
    return outputs, widths


def tokens_of(outs) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def solo(base, adapters, which, ids, n, engine) -> list[int]:
    model = base if which is None else adapters[which][1]
    [eos] = engine.eos_token_ids
    return _reference_tokens(model, ids, n, eos)


def test_requests_joining_mid_flight_get_their_solo_tokens(setup):
    base, engine, adapters = setup
    core = Seq2SeqCore(engine)
    jobs = {  # request id: (adapter, input length, max_tokens, the step it arrives before)
        "a": (0, 5, 8, 0), "b": (None, 9, 6, 2), "c": (1, 3, 7, 2), "d": (1, 12, 5, 4), "e": (0, 1, 3, 6)}
    plan: dict[int, list[AddRequest]] = {}
    for r, (a, length, n, at) in jobs.items():
        kv = None if a is None else adapters[a][2]
        plan.setdefault(at, []).append(add(r, _ids(ord(r), length), payload(kv, f"p{a}"), n))
    outputs, widths = run(core, plan)
    assert max(widths) >= 3  # rows with different prefixes shared decoder steps
    for r, (a, length, n, _) in jobs.items():
        got = tokens_of(outputs[r])
        assert got == solo(base, adapters, a, _ids(ord(r), length), n, engine), r
        assert outputs[r][-1].finished and sum(o.finished for o in outputs[r]) == 1
        assert len(outputs[r]) == len(got)  # streamed: one output per token
    assert core.reserved == 0 and not core.running and not core.waiting


def test_encoder_and_cross_kv_run_once_per_request_at_admission(setup):
    _, engine, adapters = setup
    calls = {"encoder": 0, "cross": 0}
    cross_k = (engine.decoder.layers[-1].encoder_attn.k_proj if engine.arch == "bart"
               else engine.decoder.block[-1].layer[1].EncDecAttention.k)
    hooks = [engine.encoder.register_forward_hook(lambda *a: calls.__setitem__("encoder", calls["encoder"] + 1)),
             cross_k.register_forward_hook(lambda *a: calls.__setitem__("cross", calls["cross"] + 1))]
    try:
        core = Seq2SeqCore(engine)
        outputs, _ = run(core, {0: [add("a", _ids(1, 4), payload(adapters[0][2], "p0"), 6, ignore_eos=True),
                                    add("b", _ids(2, 7), None, 6, ignore_eos=True)],
                                3: [add("c", _ids(3, 5), None, 6, ignore_eos=True)]})
    finally:
        for h in hooks:
            h.remove()
    assert all(len(tokens_of(o)) == 6 for o in outputs.values())
    assert calls == {"encoder": 2, "cross": 3}  # one encoder pass per admission, cross kv per request


def test_abort_frees_the_request_state_at_once(setup):
    _, engine, adapters = setup
    core = Seq2SeqCore(engine)
    core.apply([add("a", _ids(1, 10), payload(adapters[1][2], "p1"), 20, ignore_eos=True),
                add("b", _ids(2, 4), None, 20, ignore_eos=True)])
    core.step()
    core.step()
    [row_a] = [r for r in core.running if r.req.request_id == "a"]
    state = weakref.ref(row_a.state)
    held = core.reserved
    assert held == (10 + 8 + 20) + (4 + 0 + 20)
    core.apply([Abort("a")])
    gc.collect()
    assert state() is None  # its cross kv and decoder slots are gone
    assert core.reserved == 4 + 20 and [r.req.request_id for r in core.running] == ["b"]
    batch = core.step()
    assert [o.request_id for o in batch.outputs] == ["b"]  # nothing more for the aborted one
    assert batch.stats.kv_blocks_free == core.budget - (4 + 20)
    # its prefix is no longer in use: a stale-version drop forgets it
    core.apply([DropStale("acme", "p1", "v2")])
    assert core.step().forgotten == [(PrefixRef("acme", "p1", "v1"),)]
    # aborting a request that waits frees its place in the queue
    core.apply([add("c", _ids(3, 4), None, 5), Abort("c"), Abort("nobody")])
    assert not core.waiting


def test_a_full_budget_queues_requests_until_slots_come_back(setup):
    base, engine, adapters = setup
    # each request holds 6 + P + 8 slots; the budget holds two of them, not three
    core = Seq2SeqCore(engine, config=EngineConfig(num_blocks=2 * (6 + 8 + 8), block_size=1))
    kv = adapters[1][2]  # P = 8
    cmds = [add(r, _ids(50 + i, 6), payload(kv, "p1"), 8) for i, r in enumerate("xyz")]
    core.apply(cmds)
    first = core.step()
    assert first.stats.num_running == 2 and first.stats.num_waiting == 1 and first.stats.waiting_by_tenant == {"": 1}
    assert [r.req.request_id for r in core.waiting] == ["z"]
    outputs, _ = run(core, {0: []})
    for o in first.outputs:
        outputs[o.request_id].insert(0, o)
    for i, r in enumerate("xyz"):
        assert tokens_of(outputs[r]) == solo(base, adapters, 1, _ids(50 + i, 6), 8, engine), r
    assert core.reserved == 0
    # one that can never fit is refused at once, with the numbers
    core.apply([add("big", _ids(9, 30), payload(kv, "p1"), 20)])
    [(rid, err)] = core.step().rejected
    assert rid == "big" and isinstance(err, RequestError)
    assert "needs 58 token slots (prompt 30 + prefix 8 + max_tokens 20); the engine holds 44" in str(err)


def test_freed_slots_go_to_the_least_served_tenant_not_the_oldest_request(setup):
    base, engine, adapters = setup
    # the budget holds two requests: a tenant that floods the queue first does not hold
    # every slot until its backlog drains; the later tenant's requests are admitted between
    core = Seq2SeqCore(engine, config=EngineConfig(num_blocks=2 * (6 + 4), block_size=1))
    flood = [AddRequest(f"a{i}", _ids(60 + i, 6), SamplingParams(max_tokens=4, ignore_eos=True), None, float(i),
                        tenant="a") for i in range(6)]
    late = [AddRequest(f"b{i}", _ids(70 + i, 6), SamplingParams(max_tokens=4, ignore_eos=True), None, 10.0 + i,
                       tenant="b") for i in range(2)]
    core.apply(flood)
    core.step()  # a0 and a1 run
    core.apply(late)
    order: list[str] = []
    for _ in range(100):
        if not core.has_unfinished():
            break
        before = {r.req.request_id for r in core.running}
        core.step()
        order += [r.req.request_id for r in core.running if r.req.request_id not in before]
    # FIFO would admit a2..a5 before b0; VTC admits b0 first (b joined at a's counter: idle
    # time is no credit) and then alternates, b1 before the end of a's backlog
    assert order[0] == "b0" and order.index("b1") < order.index("a4"), order
    assert sorted(order) == [f"a{i}" for i in range(2, 6)] + ["b0", "b1"] and core.reserved == 0
    # within a tenant, first come first served
    assert [r for r in order if r.startswith("a")] == ["a2", "a3", "a4", "a5"]


def test_non_streaming_requests_get_one_output(setup):
    base, engine, adapters = setup
    core = Seq2SeqCore(engine)
    outputs, _ = run(core, {0: [add("q", _ids(4, 6), payload(adapters[0][2], "p0"), 6, stream=False),
                                add("s", _ids(5, 6), None, 6)]})
    [only] = outputs["q"]
    assert only.finished and only.new_token_ids == solo(base, adapters, 0, _ids(4, 6), 6, engine)
    assert len(outputs["s"]) == len(tokens_of(outputs["s"]))


def test_eos_stops_unless_ignored():
    engine = PrefixSeq2Seq(tiny_bart())
    core = Seq2SeqCore(engine)
    ids = _ids(7, 5)
    free, _ = run(core, {0: [add("free", ids, None, 8, ignore_eos=True)]})
    tokens = tokens_of(free["free"])
    k = next(k for k in range(1, len(tokens)) if tokens[k] not in tokens[:k])
    engine.eos_token_ids = frozenset({tokens[k]})
    outputs, _ = run(core, {0: [add("stop", ids, None, 8), add("ignore", ids, None, 8, ignore_eos=True)]})
    assert tokens_of(outputs["stop"]) == tokens[:k + 1]
    assert outputs["stop"][-1].finish_reason is FinishReason.STOP
    assert tokens_of(outputs["ignore"]) == tokens and outputs["ignore"][-1].finish_reason is FinishReason.LENGTH


def test_seeded_sampling_and_logprobs_do_not_depend_on_the_batch(setup):
    _, engine, adapters = setup
    kv = adapters[0][2]
    ids = _ids(11, 6)
    sampled = dict(max_tokens=6, temperature=0.9, top_p=0.8, seed=1234, ignore_eos=True, logprobs=2)
    alone, _ = run(Seq2SeqCore(engine), {0: [add("s", ids, payload(kv, "p0"), **sampled)]})
    mixed, _ = run(Seq2SeqCore(engine), {0: [add("g", _ids(12, 9), None, 8)],
                                         1: [add("s", ids, payload(kv, "p0"), **sampled),
                                             add("h", _ids(13, 3), payload(adapters[1][2], "p1"), 5)]})
    assert tokens_of(alone["s"]) == tokens_of(mixed["s"])
    got = [lp for o in mixed["s"] for lp in o.logprobs]
    want = [lp for o in alone["s"] for lp in o.logprobs]
    assert [lp.token_id for lp in got] == tokens_of(alone["s"])
    assert all(abs(a.logprob - b.logprob) < 1e-4 and len(a.top) == 2 for a, b in zip(got, want))
    # the logprobs are those of the model's float32 logits (PrefixSeq2Seq.generate, at PEFT parity)
    from server.engine.seq2seq import Seq2SeqInput

    greedy, _ = run(Seq2SeqCore(engine), {0: [add("g", ids, payload(kv, "p0"), 4, ignore_eos=True, logprobs=0)]})
    [ref] = engine.generate([Seq2SeqInput(ids, kv, 4)], return_logits=True)
    lps = [lp.logprob for o in greedy["g"] for lp in o.logprobs]
    want_lps = torch.log_softmax(ref.logits, -1).gather(1, torch.tensor(ref.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(lps), want_lps[:len(lps)], atol=1e-4)


def by_sample(outs) -> dict[int, list[int]]:
    got: dict[int, list[int]] = {}
    for o in outs:
        got.setdefault(o.index, []).extend(o.new_token_ids)
    return got


def test_n_samples_share_one_encoder_pass_and_do_not_depend_on_the_batch(setup):
    base, engine, adapters = setup
    kv = adapters[1][2]
    ids = _ids(21, 7)
    calls = {"encoder_rows": 0}
    hook = engine.encoder.register_forward_hook(
        lambda m, args, kwargs, out: calls.__setitem__("encoder_rows", calls["encoder_rows"] + out[0].shape[0]),
        with_kwargs=True)
    try:
        sampled = dict(max_tokens=6, temperature=1.0, seed=7, ignore_eos=True, n=3)
        alone, _ = run(Seq2SeqCore(engine), {0: [add("s", ids, payload(kv, "p1"), **sampled)]})
        assert calls["encoder_rows"] == 1  # three samples, one encoder row
    finally:
        hook.remove()
    core = Seq2SeqCore(engine)
    mixed, _ = run(core, {0: [add("g", _ids(22, 5), payload(adapters[0][2], "p0"), 8, ignore_eos=True)],
                          1: [add("s", ids, payload(kv, "p1"), **sampled),
                              add("greedy", ids, payload(kv, "p1"), 6, n=2)]})
    samples = by_sample(alone["s"])
    assert sorted(samples) == [0, 1, 2] and by_sample(mixed["s"]) == samples
    assert len({tuple(t) for t in samples.values()}) > 1  # the samples draw apart
    assert sum(o.finished for o in mixed["s"]) == 3
    greedy = by_sample(mixed["greedy"])
    assert greedy[0] == greedy[1] == solo(base, adapters, 1, ids, 6, engine)
    assert core.reserved == 0
    # an abort ends every sample and frees their slots
    core.apply([add("gone", ids, payload(kv, "p1"), 20, n=3, ignore_eos=True)])
    core.step()
    assert len(core.running) == 3
    core.apply([Abort("gone")])
    core.step()
    assert not core.has_unfinished() and core.reserved == 0


def test_bad_requests_are_refused_and_the_loop_goes_on(setup):
    _, engine, adapters = setup
    core = Seq2SeqCore(engine)
    limit = engine.spec.max_model_len
    core.apply([add("long", [3] * (limit + 1), None, 4),
                add("plp", _ids(1, 3), None, 4, prompt_logprobs=1),
                add("many", _ids(1, 3), payload(adapters[1][2], "p1"), limit - 7),
                add("ok", _ids(1, 3), None, 2)])
    batch = core.step()
    errors = {rid: str(e) for rid, e in batch.rejected}
    assert errors["long"] == f"prompt of {limit + 1} tokens is longer than the encoder's {limit} positions"
    assert errors["plp"].startswith("prompt_logprobs: not supported for encoder-decoder models yet")
    assert errors["many"].startswith(f"prefix 8 + max_tokens {limit - 7} = {limit + 1} exceeds the decoder's {limit}")
    assert "ok" not in errors and batch.outputs[0].request_id == "ok"


def test_a_forgotten_prefix_is_asked_for_again(setup):
    _, engine, adapters = setup
    kv = adapters[0][2]
    core = Seq2SeqCore(engine, host_prefix_bytes=kv.numel() * kv.element_size())  # room for one copy
    first = payload(kv, "p0")
    other = payload(adapters[1][2], "p1")
    run(core, {0: [add("a", _ids(1, 3), first, 2)]})
    core.apply([add("b", _ids(1, 3), other, 2)])
    assert core.step().forgotten == [first.key]
    core.apply([add("c", _ids(1, 3), PrefixPayload(first.key, first.refs, None), 2)])
    assert core.step().need_prefix == ["c"]
    core.apply([Stop()])
    assert core.stopped
