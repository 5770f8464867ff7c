"""The asyncio wrapper: concurrent callers, abort on early exit, bounded queue."""

from __future__ import annotations

import asyncio
import os

import pytest
import torch

from server.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError, RequestTimeoutError
from server.engine.sampling_params import SamplingParams
from server.prefix import PrefixRef
from tests.factories import make_engine, random_prefix, tiny_llama


async def _collect(aeng, rid, prompt, params, prefix=None):
    tokens, last = [], None
    async for out in aeng.generate(rid, prompt, params, prefix):
        tokens += out.new_token_ids
        last = out
    return tokens, last


def test_concurrent_callers_get_their_own_tokens():
    engine = make_engine(tiny_llama(), num_blocks=128)
    prefixes = [random_prefix(engine, n, seed=n) for n in (2, 5)] + [None]
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    want = [engine.generate([[4 + i, 9]], params, [prefixes[i % 3]])[0].output_token_ids for i in range(6)]

    async def main():
        aeng = AsyncEngine(engine)
        await aeng.start()
        try:
            results = await asyncio.gather(*[_collect(aeng, f"r{i}", [4 + i, 9], params, prefixes[i % 3])
                                             for i in range(6)])
        finally:
            await aeng.shutdown()
        return results

    results = asyncio.run(main())
    assert [r[0] for r in results] == want
    assert all(r[1].finished and r[1].finish_reason.value == "length" for r in results)


def test_consumer_leaving_early_aborts_and_frees_blocks():
    engine = make_engine(tiny_llama(), num_blocks=64)
    prefix = random_prefix(engine, 6, seed=1)

    async def main():
        aeng = AsyncEngine(engine)
        await aeng.start()
        gen = aeng.generate("r", [5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True), prefix)
        await gen.__anext__()
        await gen.aclose()  # the client went away
        for _ in range(100):
            await asyncio.sleep(0.02)
            if aeng.stats().num_running == 0 and not engine.has_unfinished():
                break
        await aeng.shutdown()

    asyncio.run(main())
    assert not engine.requests
    assert engine.kv.pool.num_free == 64 - engine.kv.prefixes.num_blocks
    assert engine.kv.prefixes.get(prefix.key).users == 0


def test_a_request_past_its_timeout_is_aborted_streamed_or_not():
    """One timer per request: past timeout_s the caller gets RequestTimeoutError and the
    engine drops the request (blocks freed), whether it streamed tokens or waited for the end."""
    engine = make_engine(tiny_llama(), num_blocks=64)
    prefix = random_prefix(engine, 3, seed=2)
    slow_step = engine.step

    def step():  # a slow engine: a long request cannot finish in the timeout
        import time
        time.sleep(0.01)
        return slow_step()

    engine.step = step
    params = SamplingParams(max_tokens=200, ignore_eos=True)  # 200 steps of 10 ms: 2 s

    async def main():
        aeng = AsyncEngine(engine)
        await aeng.start()
        got = []
        for stream in (True, False):
            tokens = 0
            with pytest.raises(RequestTimeoutError, match="longer than 0.2 s"):
                async for out in aeng.generate(f"r{stream}", [5, 6], params, prefix, stream=stream, timeout_s=0.2):
                    tokens += len(out.new_token_ids)
            got.append(tokens)
        fast = [o async for o in aeng.generate("fast", [5, 6], SamplingParams(max_tokens=3, ignore_eos=True),
                                                   prefix, timeout_s=0.2)]
        for _ in range(100):
            await asyncio.sleep(0.02)
            if not engine.has_unfinished():
                break
        await aeng.shutdown()
        return got, fast

    (streamed, quiet), fast = asyncio.run(main())
    assert 0 < streamed < 200 and quiet == 0  # tokens came before the timeout only when streamed
    assert fast[-1].finished and sum(len(o.new_token_ids) for o in fast) == 3
    assert not engine.requests
    assert engine.kv.pool.num_free == 64 - engine.kv.prefixes.num_blocks


def test_queue_full_and_bad_requests_raise_in_the_caller():
    engine = make_engine(tiny_llama(), num_blocks=64)

    async def main():
        aeng = AsyncEngine(engine, max_waiting=0)
        with pytest.raises(QueueFullError, match="0 requests are already waiting"):
            await aeng.generate("r", [5], SamplingParams()).__anext__()
        aeng.max_waiting = 8
        with pytest.raises(ValueError, match="prompt is empty"):
            await aeng.generate("r", [], SamplingParams()).__anext__()

    asyncio.run(main())
    assert not engine.has_unfinished()


def test_requests_sent_into_free_slots_are_not_counted_as_waiting():
    # After a step that finished a whole batch every slot is free: the next max_num_seqs
    # requests will run at the next step and must not be refused as if they waited.
    engine = make_engine(tiny_llama(), num_blocks=64, max_num_seqs=2)

    async def main():
        aeng = AsyncEngine(engine, max_waiting=1)  # not started: no step runs, nothing is taken off
        gens = [aeng.generate(f"r{i}", [5, 6], SamplingParams(max_tokens=2)) for i in range(4)]
        pending = [asyncio.ensure_future(g.__anext__()) for g in gens[:3]]
        await asyncio.sleep(0.01)  # all three sent: two into the free slots, one waits
        assert not any(task.done() for task in pending), [t.exception() for t in pending if t.done()]
        assert aeng.num_waiting == 1
        with pytest.raises(QueueFullError):
            await gens[3].__anext__()
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    asyncio.run(main())


def test_a_batch_from_before_a_request_was_seen_does_not_lose_its_count():
    # The core may send a step's batch just before it reads a new request; arriving after
    # the request was sent, that batch's stats do not count it. CI saw such a batch make a
    # tenant's waiting request vanish from the queue shares.
    from server.engine.engine_core import StepBatch
    from server.engine.outputs import EngineStats

    engine = make_engine(tiny_llama(), num_blocks=64, max_num_seqs=1)

    async def main():
        aeng = AsyncEngine(engine, max_waiting=8)  # not started: the test plays the core
        aeng.connect()
        aeng._stats = EngineStats(num_running=1)  # the only slot is taken
        gens = [aeng.generate(f"r{i}", [5, 6], SamplingParams(max_tokens=2), tenant=t)
                for i, t in enumerate(("heavy", "heavy", "light"))]
        pending = [asyncio.ensure_future(g.__anext__()) for g in gens]
        await asyncio.sleep(0.01)  # all three sent (seq 1, 2, 3)
        assert aeng.waiting_by_tenant() == {"heavy": 2, "light": 1} and aeng.num_waiting == 3
        # a batch whose stats were taken after the core applied seq 1 and 2 only
        aeng._on_message(StepBatch(stats=EngineStats(num_running=1, num_waiting=2, waiting_by_tenant={"heavy": 2}),
                                   added_through=2))
        assert aeng.waiting_by_tenant() == {"heavy": 2, "light": 1} and aeng.num_waiting == 3
        # the next one counts all three: nothing is counted twice
        aeng._on_message(StepBatch(stats=EngineStats(num_running=1, num_waiting=3,
                                                     waiting_by_tenant={"heavy": 2, "light": 1}), added_through=3))
        assert aeng.waiting_by_tenant() == {"heavy": 2, "light": 1} and aeng.num_waiting == 3
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    asyncio.run(main())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama saved as a HF folder, for an engine process to load."""
    from tests.training.conftest import make_byte_tokenizer, make_tiny_llama

    folder = tmp_path_factory.mktemp("engine-process") / "tiny"
    make_tiny_llama().save_pretrained(folder)
    make_byte_tokenizer().save_pretrained(folder)
    return folder


def _process_engine(model_dir, host_prefix_bytes: int = 1 << 30, max_waiting: int = 256,
                    arena_bytes: int = 64 << 20) -> AsyncEngine:
    from server.engine.config import EngineConfig
    from server.engine.engine_process import EngineProcessConfig
    from server.engine.model_loader import load_tokenizer

    config = EngineProcessConfig(model=str(model_dir), dtype="float32", device="cpu", cache_dir=None,
                                 engine=EngineConfig(block_size=4, num_blocks=256), host_prefix_bytes=host_prefix_bytes,
                                 arena_bytes=arena_bytes)
    return AsyncEngine(process=config, tokenizer=load_tokenizer(model_dir), max_waiting=max_waiting)


def test_an_engine_process_gives_the_tokens_of_the_engine_here(model_dir):
    """The step loop in its own process: the same tokens as an in-process engine, streamed or
    sent once when finished; prefixes the engine forgot are sent again without the caller
    noticing; an early exit aborts; a bad request is refused in the caller."""
    from server.engine.llm_engine import LLMEngine
    from server.engine.model_loader import load_model
    from server.engine.config import EngineConfig

    loaded = load_model(str(model_dir), "float32", "cpu")
    here = LLMEngine(loaded.model, loaded.tokenizer, EngineConfig(block_size=4, num_blocks=256))
    kvs = [torch.randn(here.spec.kv_shape(n), generator=torch.Generator().manual_seed(n)) for n in (3, 6, 9)]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    want = [here.generate([[40 + i, 41]], params, [here.make_prefix(kvs[i % 3])])[0].output_token_ids
            for i in range(6)]

    async def main():
        # a host budget that holds one prefix: the core forgets, and asks for, the others
        aeng = _process_engine(model_dir, host_prefix_bytes=kvs[2].numel() * 4)
        await aeng.start()
        try:
            prefixes = [aeng.make_prefix(kv, (PrefixRef("t", f"p{i}", "v"),)) for i, kv in enumerate(kvs)]
            got = await asyncio.gather(*[_collect(aeng, f"r{i}", [40 + i, 41], params, prefixes[i % 3])
                                         for i in range(6)])
            extra = aeng.make_prefix(kvs[0] * 2, (PrefixRef("t", "extra", "v"),))
            await _collect(aeng, "extra", [40, 41], params, extra)  # the core forgets the three, unused now
            again = [await _collect(aeng, f"s{i}", [40 + i, 41], params, prefixes[i % 3]) for i in range(3)]
            # the race the protocol covers: the core forgot a prefix this side still believes it
            # holds (the notice was on its way): the core asks, this side sends the tensor again
            forgotten = [p.key for p in prefixes if p.key not in aeng._core_has]
            assert forgotten, "the small host budget should have made the core forget a prefix"
            aeng._core_has.update(forgotten)
            raced = await _collect(aeng, "race", [40, 41], params, prefixes[0])
            quiet = [out async for out in aeng.generate("q", [40, 41], params, prefixes[0], stream=False)]
            gen = aeng.generate("long", [5, 6], SamplingParams(max_tokens=200, ignore_eos=True), prefixes[1])
            await gen.__anext__()
            await gen.aclose()  # the client went away
            with pytest.raises(ValueError, match="outside the vocabulary"):
                await aeng.generate("bad", [9999], params).__anext__()
            for _ in range(200):
                await asyncio.sleep(0.02)
                if aeng.stats().num_running == 0:
                    break
            return got, again + [raced], quiet, aeng.stats()
        finally:
            await aeng.shutdown(drain_timeout=5)

    got, again, quiet, stats = asyncio.run(main())
    assert [tokens for tokens, _ in got] == want
    assert [tokens for tokens, _ in again] == want[:3] + [want[0]]
    assert len(quiet) == 1 and quiet[0].finished and quiet[0].new_token_ids == want[0]
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.kv_blocks_free + stats.kv_blocks_used_by_prefixes == stats.kv_blocks_total


def test_a_dead_engine_process_fails_its_requests_and_says_so(model_dir):
    async def main():
        aeng = _process_engine(model_dir)
        await aeng.start()
        gen = aeng.generate("r", [5, 6], SamplingParams(max_tokens=250, ignore_eos=True))
        try:
            await gen.__anext__()
            name = aeng._channel.arena.name
            aeng._channel._proc.kill()  # the engine process dies (OOM killer, a crash)
            with pytest.raises(EngineDeadError):
                async for _ in gen:
                    pass
            assert not aeng.is_alive and "engine process is gone" in aeng.error
            with pytest.raises(EngineDeadError):
                await aeng.generate("r2", [5], SamplingParams()).__anext__()
        finally:
            await aeng.shutdown(drain_timeout=0)
        return name

    name = asyncio.run(main())
    assert not os.path.exists(f"/dev/shm/{name}")  # the arena went with the engine at shutdown


@pytest.mark.parametrize("arena_bytes", [1 << 20, 64 * 4, 0], ids=["shared-memory", "arena-full", "pipe-only"])
def test_a_prefix_crossing_by_shared_memory_or_pipe_gives_the_engine_here_logprobs(model_dir, arena_bytes):
    """Prefix tensors reach the engine process in arena slots (or, when the arena is full or
    off, in the pipe): the same greedy tokens and logprobs, and the same prompt kv, as an
    engine in this process; every slot is freed, and no segment is left after shutdown."""
    from server.engine.config import EngineConfig
    from server.engine.llm_engine import LLMEngine
    from server.engine.model_loader import load_model

    loaded = load_model(str(model_dir), "float32", "cpu")
    here = LLMEngine(loaded.model, loaded.tokenizer, EngineConfig(block_size=4, num_blocks=256))
    kvs = [torch.randn(here.spec.kv_shape(n), generator=torch.Generator().manual_seed(10 + n)) for n in (2, 7)]
    params = SamplingParams(max_tokens=6, ignore_eos=True, logprobs=2)
    want = [here.generate([[30 + i, 31, 32]], params, [here.make_prefix(kvs[i % 2])])[0] for i in range(4)]
    want_kv = here.prompt_kv([7, 8, 9], here.make_prefix(kvs[1]))

    async def main():
        aeng = _process_engine(model_dir, arena_bytes=arena_bytes)
        await aeng.start()
        try:
            prefixes = [aeng.make_prefix(kv, (PrefixRef("t", f"p{i}", "v"),)) for i, kv in enumerate(kvs)]
            async def collect(i):
                outs = [out async for out in aeng.generate(f"r{i}", [30 + i, 31, 32], params, prefixes[i % 2])]
                return [t for o in outs for t in o.new_token_ids], [lp for o in outs for lp in o.logprobs]

            got = await asyncio.gather(*[collect(i) for i in range(4)])
            got_kv = await aeng.prompt_kv("kv", [7, 8, 9], aeng.make_prefix(kvs[1]))  # anonymous: a new tensor
            await asyncio.sleep(0.2)  # the last SlotsFreed
            arena = aeng._channel.arena
            counts = None if arena is None else (arena.puts, arena.fallbacks, len(arena), arena.name)
            return got, got_kv, counts
        finally:
            await aeng.shutdown(drain_timeout=5)

    got, got_kv, counts = asyncio.run(main())
    for (tokens, logprobs), ref in zip(got, want):
        assert tokens == ref.output_token_ids
        assert [lp.logprob for lp in logprobs] == pytest.approx([lp.logprob for lp in ref.logprobs], abs=1e-5)
        assert [[t[0] for t in lp.top] for lp in logprobs] == [[t[0] for t in lp.top] for lp in ref.logprobs]
    assert torch.equal(got_kv, want_kv)
    if arena_bytes == 0:
        assert counts is None
        return
    puts, fallbacks, in_use, name = counts
    # three tensors crossed (two named prefixes, once each, and the anonymous one)
    assert (puts, fallbacks) == ((3, 0) if arena_bytes == 1 << 20 else (0, 3))
    assert in_use == 0
    assert not os.path.exists(f"/dev/shm/{name}")


def test_an_engine_process_that_cannot_start_says_why_and_leaves_no_arena(tmp_path):
    from tests.training.conftest import make_byte_tokenizer

    make_byte_tokenizer().save_pretrained(tmp_path)  # a tokenizer, and no model beside it
    aeng = _process_engine(tmp_path)
    with pytest.raises(EngineDeadError, match="failed to start"):
        aeng.connect()
    name = aeng._channel.arena.name
    assert aeng._channel.arena.closed and not os.path.exists(f"/dev/shm/{name}")
