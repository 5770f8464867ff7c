"""The asyncio wrapper: concurrent callers, abort on early exit, bounded queue."""

from __future__ import annotations

import asyncio

import pytest

from server.engine.async_engine import AsyncEngine, QueueFullError
from server.engine.sampling_params import SamplingParams
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
