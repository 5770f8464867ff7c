"""An asyncio load generator for prefix-serve: loopback only, bounded in time and in count.

A load is a list of Streams, each one tenant's traffic: a key, a function that makes the
i-th request body, and either a closed loop (`concurrency` clients, each sending its next
request when its last one ended: a backlog that never drains) or an open loop (`rate`
requests a second, sent on schedule whatever the answers). Requests are streamed (SSE), and
every one is recorded: its stream, when it started, when its first token and its end came,
its status (429s counted, never retried), and when its tokens arrived, so that the tokens
served to each tenant can be counted in any window.

    records = asyncio.run(run_load(url, [Stream(...), ...], duration_s=60))

Used by bench/tenant_bench.py and bench/prefix_count_bench.py. The clients are
bench/http_client.py's lean keep-alive connections (they share the machine with the server).
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from http_client import HttpError, RawClient

MAX_DURATION_S = 900.0  # no load runs longer than this, whatever it asks
MAX_REQUESTS = 100_000  # nor sends more than this per stream


@dataclass
class Stream:
    name: str  # its label in the records (the tenant)
    key: str  # the tenant's API key
    body: Callable[[int], dict]  # i -> the i-th request's /v1/generate body ("stream" is set here)
    concurrency: int = 0  # closed loop: this many clients, one request in flight each
    rate: float = 0.0  # open loop: requests a second, on schedule
    poisson_seed: int | None = None  # open loop: exponential gaps (a Poisson process) from this seed, so the
    # arrivals fall at every phase of the engine's step cycle, not at one (fixed gaps of 1 / rate otherwise)
    max_requests: int = 10_000
    start_after_s: float = 0.0


@dataclass
class Record:
    stream: str
    start: float  # seconds since the load started
    end: float = 0.0
    first_token: float | None = None
    status: int = 200
    prompt_tokens: int = 0
    output_tokens: int = 0
    token_times: list[tuple[float, int]] = field(default_factory=list)  # (when, tokens) as they arrived

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start

    @property
    def latency(self) -> float:
        return self.end - self.start


def check_loopback(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"the load generator only talks to loopback addresses, not {host}")
    return host, parts.port or 80


async def run_load(url: str, streams: list[Stream], duration_s: float) -> list[Record]:
    """Run every stream until it sent max_requests and they ended, or duration_s passed (then
    what is in flight is cut off and recorded with status 0)."""
    host, port = check_loopback(url)
    duration_s = min(duration_s, MAX_DURATION_S)
    records: list[Record] = []
    t0 = time.perf_counter()

    def now() -> float:
        return time.perf_counter() - t0

    async def one(client: RawClient, stream: Stream, i: int) -> Record:
        rec = Record(stream.name, now())
        records.append(rec)
        try:
            async for event in client.events("/v1/generate", {**stream.body(i), "stream": True}):
                if "error" in event:
                    rec.status = 500
                    break
                got = len(event.get("token_ids") or ())
                if got:
                    t = now()
                    if rec.first_token is None:
                        rec.first_token = t
                    rec.token_times.append((t, got))
                    rec.output_tokens += got
                if event.get("usage"):
                    rec.prompt_tokens = event["usage"]["prompt_tokens"]
        except HttpError as e:
            rec.status = e.status
        rec.end = now()
        return rec

    async def closed_client(stream: Stream, c: int, counter: list[int]) -> None:
        await asyncio.sleep(stream.start_after_s)
        client = RawClient(host, port, stream.key)
        try:
            while counter[0] < min(stream.max_requests, MAX_REQUESTS):
                i = counter[0]
                counter[0] += 1
                rec = await one(client, stream, i)
                if rec.status == 429:  # back off as a client should, then go on
                    await asyncio.sleep(0.05)
        finally:
            await client.close()

    async def open_loop(stream: Stream) -> None:
        await asyncio.sleep(stream.start_after_s)
        tasks = []
        start = time.perf_counter()
        rng = random.Random(stream.poisson_seed)
        due = 0.0
        for i in range(min(stream.max_requests, MAX_REQUESTS)):
            if i:
                due += rng.expovariate(stream.rate) if stream.poisson_seed is not None else 1 / stream.rate
            delay = start + due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(_fresh_connection(one, host, port, stream, i)))
        await asyncio.gather(*tasks)

    jobs = []
    for stream in streams:
        if stream.concurrency:
            counter = [0]
            jobs += [closed_client(stream, c, counter) for c in range(stream.concurrency)]
        elif stream.rate:
            jobs.append(open_loop(stream))
    tasks = [asyncio.ensure_future(j) for j in jobs]
    done, pending = await asyncio.wait(tasks, timeout=duration_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        task.result()  # a bug in a client surfaces here
    for rec in records:
        if rec.end == 0.0:
            rec.end, rec.status = now(), 0  # cut off by the time bound
    return records


async def _fresh_connection(one, host: str, port: int, stream: Stream, i: int) -> None:
    client = RawClient(host, port, stream.key)
    try:
        await one(client, stream, i)
    finally:
        await client.close()


# ---- summaries

def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def tokens_in_window(records: list[Record], stream: str, start: float, end: float) -> int:
    """Tokens served to `stream` between start and end: its prompts' tokens counted when the
    first token came (the prefill done), output tokens as they arrived."""
    total = 0
    for r in records:
        if r.stream != stream:
            continue
        if r.first_token is not None and start <= r.first_token < end:
            total += r.prompt_tokens
        total += sum(n for t, n in r.token_times if start <= t < end)
    return total


def summary(records: list[Record], stream: str) -> dict:
    mine = [r for r in records if r.stream == stream]
    ok = [r for r in mine if r.status == 200 and r.first_token is not None]
    ttfts = [r.ttft for r in ok]
    return {"requests": len(mine), "ok": len(ok), "status_429": sum(r.status == 429 for r in mine),
            "cut_off": sum(r.status == 0 for r in mine),
            "ttft_s": {"p50": statistics.median(ttfts), "p90": percentile(ttfts, 90), "max": max(ttfts)} if ttfts else None,
            "latency_s": {"p50": statistics.median([r.latency for r in ok]),
                          "p90": percentile([r.latency for r in ok], 90)} if ok else None,
            "output_tokens": sum(r.output_tokens for r in mine)}
