"""Overload: `prefix-serve serve` driven at twice its measured capacity for a fixed time.

    .venv/bin/python bench/overload.py             # SmolLM2 (float32), 2x capacity for 60 s
    .venv/bin/python bench/overload.py --quick     # smoke run (15 s)

1. Capacity: a closed loop of `max_num_seqs + max_queue / 2` clients (at most twice
   `max_num_seqs`) sends the load's requests one after
   another; capacity = completed requests per second.
2. Overload: requests arrive at `factor * capacity` per second (evenly spaced, open loop: an
   arrival never waits for an answer) for `duration_s`. The server admits `max_num_seqs`
   running + `max_queue` waiting requests; every other one must get 429 with Retry-After,
   at once. Counted: every status, 5xx and transport errors (must be 0), accepted requests
   that did not complete (must be 0).
3. Right tokens: every request is deterministic (greedy, or sampled with a seed); after the
   load each distinct request is sent again alone and every accepted answer to it must
   have exactly its tokens (mixed batches, preemption and queueing change nothing).
4. Memory: the RSS of serve and its engine process, idle before, the peak during, and idle
   after (the server must give back what the overload took).
5. Ready again: /ready polled right after the last answer (seconds until 200), then a request.

tests/reliability/test_overload.py runs the same code on a tiny model (a few seconds) and
asserts on the figures; this script runs it on SmolLM2 for the README's. Writes
bench/results/overload.json. Every request goes to 127.0.0.1; every loop is bounded by a
count and a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
ADMIN_KEY = "bench-admin-key-0123456789abcdef"


@dataclass(frozen=True)
class Load:
    """What the requests look like: request i uses prefix i % P and prompt (i // P) % N."""

    prefixes: tuple[str | None, ...]  # prefix ids of the tenant (None: the base model)
    prompts: tuple[str, ...]
    max_tokens: int

    def request(self, i: int) -> tuple[dict, bool]:
        """(body, stream) of request i: greedy JSON, greedy streamed, or sampled with a seed."""
        prefix = self.prefixes[i % len(self.prefixes)]
        prompt = self.prompts[(i // len(self.prefixes)) % len(self.prompts)]
        body = {"prompt": prompt, "max_tokens": self.max_tokens, "ignore_eos": True}
        if prefix is not None:
            body["prefix_id"] = prefix
        kind = i % 4
        if kind == 3:
            body.update(temperature=0.8, seed=i % 5)
        return body, kind == 2


@dataclass
class Outcome:
    key: str  # the request without `stream`: equal keys must give equal tokens
    status: int  # 0: no HTTP answer (transport error)
    tokens: list[int] = field(default_factory=list)
    completed: bool = False  # an accepted request that ran to its finish_reason
    retry_after: str | None = None
    error: str = ""


def _key(body: dict) -> str:
    return json.dumps(body, sort_keys=True)


async def send(http: httpx.AsyncClient, body: dict, stream: bool) -> Outcome:
    out = Outcome(_key(body), 0)
    try:
        if not stream:
            r = await http.post("/v1/generate", json=body)
            out.status, out.retry_after = r.status_code, r.headers.get("retry-after")
            if r.status_code == 200:
                data = r.json()
                out.tokens, out.completed = data["token_ids"], data["finish_reason"] in ("length", "stop")
            else:
                out.error = r.text[:300]
            return out
        async with http.stream("POST", "/v1/generate", json={**body, "stream": True}) as r:
            out.status, out.retry_after = r.status_code, r.headers.get("retry-after")
            if r.status_code != 200:
                out.error = (await r.aread()).decode(errors="replace")[:300]
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    out.error = json.dumps(event)[:300]
                    return out
                out.tokens += event["token_ids"]
                out.completed = out.completed or event.get("finish_reason") is not None
    except httpx.HTTPError as e:
        out.error = f"{type(e).__name__}: {e}"[:300]
    return out


# --- memory

def rss_bytes(pid: int) -> int:
    """Resident memory of `pid` and all its descendants (serve, its engine process, workers)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration, ValueError):
            continue
    return total


class RssSampler:
    def __init__(self, pid: int, every_s: float = 0.2) -> None:
        self.pid, self.every_s, self.samples = pid, every_s, []

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.samples.append(rss_bytes(self.pid))
            try:
                await asyncio.wait_for(stop.wait(), self.every_s)
            except asyncio.TimeoutError:
                pass


async def settled_rss(pid: int, seconds: float = 2.0) -> int:
    """The median RSS over `seconds` of an idle server (allocator noise averaged out)."""
    samples = []
    for _ in range(max(1, int(seconds / 0.2))):
        samples.append(rss_bytes(pid))
        await asyncio.sleep(0.2)
    return int(statistics.median(samples))


# --- the phases

def client(url: str, key: str, connections: int, timeout_s: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout_s,
                             limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections))


async def measure_capacity(url: str, key: str, load: Load, clients: int, requests: int,
                           timeout_s: float = 120.0) -> dict:
    """Completed requests per second of a closed loop of `clients` (no request refused)."""
    async with client(url, key, clients, timeout_s) as http:
        await asyncio.gather(*[send(http, *load.request(i)) for i in range(len(load.prefixes))])  # warm
        counter = iter(range(requests))
        outcomes: list[Outcome] = []

        async def one_client() -> None:
            for i in counter:
                outcomes.append(await send(http, *load.request(i)))

        t0 = time.perf_counter()
        await asyncio.gather(*[one_client() for _ in range(clients)])
        dt = time.perf_counter() - t0
    statuses = Counter(o.status for o in outcomes)
    if statuses != Counter({200: requests}):
        raise RuntimeError(f"the capacity run was refused or failed: {dict(statuses)}: "
                           f"{[o.error for o in outcomes if o.status != 200][:3]}")
    return {"clients": clients, "requests": requests, "seconds": dt, "requests_per_s": requests / dt}


async def overload(url: str, key: str, load: Load, rate: float, duration_s: float, max_in_flight: int,
                   server_pid: int | None, timeout_s: float = 300.0) -> tuple[dict, list[Outcome]]:
    """Open-loop arrivals at `rate`/s for `duration_s`; at most `max_in_flight` outstanding
    (a bound on this client, counted as `not_sent` when hit: the server's admission should
    keep far below it)."""
    outcomes: list[Outcome] = []
    stop = asyncio.Event()
    sampler = RssSampler(server_pid) if server_pid else None
    rss_before = await settled_rss(server_pid) if server_pid else None
    sampling = asyncio.ensure_future(sampler.run(stop)) if sampler else None
    not_sent = 0
    async with client(url, key, max_in_flight, timeout_s) as http:
        tasks: set[asyncio.Task] = set()
        t0 = time.perf_counter()
        sent = 0
        while (elapsed := time.perf_counter() - t0) < duration_s:
            due = min(int(elapsed * rate) + 1, int(duration_s * rate))
            while sent < due:
                if len(tasks) >= max_in_flight:
                    not_sent += 1
                else:
                    task = asyncio.ensure_future(send(http, *load.request(sent)))
                    task.add_done_callback(lambda t: (tasks.discard(t), outcomes.append(t.result())))
                    tasks.add(task)
                sent += 1
            await asyncio.sleep(min(0.01, 0.5 / rate))
        offered_s = time.perf_counter() - t0
        if tasks:
            await asyncio.wait(tasks)
        drained_s = time.perf_counter() - t0
        # ready again: /ready right after the last answer, then one request
        ready_t0 = time.perf_counter()
        ready_status = 0
        for _ in range(300):  # at most ~30 s
            try:
                ready_status = (await http.get("/ready")).status_code
            except httpx.HTTPError:
                ready_status = 0
            if ready_status == 200:
                break
            await asyncio.sleep(0.1)
        ready_after_s = time.perf_counter() - ready_t0
        after = await send(http, *load.request(0))
    stop.set()
    if sampling:
        await sampling
    rss_after = await settled_rss(server_pid) if server_pid else None
    statuses = Counter(o.status for o in outcomes)
    accepted = [o for o in outcomes if o.status == 200]
    refused = [o for o in outcomes if o.status == 429]
    figures = {
        "offered_rate_per_s": rate, "duration_s": duration_s, "offered_seconds": offered_s,
        "drained_seconds": drained_s, "sent": len(outcomes), "not_sent_client_bound": not_sent,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "accepted": len(accepted), "accepted_per_s": len(accepted) / offered_s,
        "accepted_not_completed": sum(not o.completed for o in accepted),
        "refused_429": len(refused), "refused_without_retry_after": sum(o.retry_after is None for o in refused),
        "server_errors_5xx": sum(o.status >= 500 for o in outcomes),
        "transport_errors": sum(o.status == 0 for o in outcomes),
        "other_statuses": sum(o.status not in (0, 200, 429) and o.status < 500 for o in outcomes),
        "errors_sample": sorted({o.error for o in outcomes if o.status not in (200, 429)})[:5],
        "ready_status_after": ready_status, "ready_after_s": ready_after_s,
        "request_after_status": after.status,
    }
    if sampler:
        figures["rss_mb"] = {"before": rss_before / 2**20, "peak_during": max(sampler.samples) / 2**20,
                             "after": rss_after / 2**20}
    return figures, outcomes


async def check_alone(url: str, key: str, outcomes: list[Outcome], timeout_s: float = 120.0) -> dict:
    """Send every distinct accepted request again, alone; count answers whose tokens differ."""
    accepted = [o for o in outcomes if o.status == 200 and o.completed]
    by_key: dict[str, list[Outcome]] = {}
    for o in accepted:
        by_key.setdefault(o.key, []).append(o)
    mismatches, examples = 0, []
    async with client(url, key, 1, timeout_s) as http:
        for k, group in by_key.items():
            alone = await send(http, json.loads(k), False)
            if alone.status != 200:
                raise RuntimeError(f"the request alone failed: {alone.status} {alone.error}")
            for o in group:
                if o.tokens != alone.tokens:
                    mismatches += 1
                    if len(examples) < 3:
                        examples.append({"request": k, "alone": alone.tokens, "under_load": o.tokens})
    return {"distinct_requests": len(by_key), "answers_checked": len(accepted), "mismatches": mismatches,
            "mismatch_examples": examples}


async def run(url: str, key: str, load: Load, server_pid: int | None, *, max_num_seqs: int, max_queue: int,
              factor: float = 2.0, duration_s: float = 60.0, capacity_requests: int | None = None) -> dict:
    """The whole benchmark against a running server; the figures (tests assert on them)."""
    clients = max(1, min(2 * max_num_seqs, max_num_seqs + max_queue // 2))  # busy, never refused
    capacity = await measure_capacity(url, key, load, clients, capacity_requests or 10 * clients)
    rate = factor * capacity["requests_per_s"]
    # this client's own bound: 4 s of arrivals, so on a slow or busy machine it is the server's
    # admission (429 at once), not this bound, that limits what is in flight
    bound = max(4 * (max_num_seqs + max_queue) + 16, int(4 * rate))
    figures, outcomes = await overload(url, key, load, rate, duration_s, bound, server_pid)
    return {"capacity": capacity, "factor": factor, "overload": figures,
            "alone_check": await check_alone(url, key, outcomes)}


# --- the script: SmolLM2 in a `prefix-serve serve` process

PROMPTS = ("The capital of France is", "Write a haiku about the sea.", "List three prime numbers:",
           "name[The Eagle], eatType[coffee shop], food[French]", "Once upon a time,", "def fibonacci(n):")


def start_server(redis_url: str, port: int, args: argparse.Namespace) -> subprocess.Popen:
    from server.cache_dir import default_cache_dir

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PREFIX_SERVE_")},
           "PREFIX_SERVE_ADMIN_KEY": ADMIN_KEY}
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--redis-url", redis_url,
                             "--port", str(port), "--dtype", args.dtype, "--workers", "0",
                             "--max-num-seqs", str(args.max_num_seqs), "--max-queue", str(args.max_queue),
                             "--cache-dir", str(default_cache_dir()), "--log-level", "warning"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not become ready in 300 s")


def main() -> None:
    sys.path.insert(0, str(ROOT))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="15 s of overload")
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--factor", type=float, default=2.0, help="offered load / measured capacity")
    parser.add_argument("--dtype", default="float32", help="float32: batched greedy tokens equal the lone ones")
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--max-queue", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "overload.json"))
    args = parser.parse_args()
    duration = 15.0 if args.quick else args.duration_s

    import torch
    from safetensors.torch import save

    from prefix_store.redis_process import RedisServer, free_port
    from transformers import AutoConfig

    from server.engine.model_loader import ensure_default_model

    cfg = AutoConfig.from_pretrained(ensure_default_model())
    kv_shape = (cfg.num_hidden_layers, 2, cfg.num_key_value_heads, 16, cfg.hidden_size // cfg.num_attention_heads)
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp, RedisServer(datadir=Path(tmp) / "redis") as redis_server:
        proc = start_server(redis_server.url, port, args)
        url = f"http://127.0.0.1:{port}"
        try:
            admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
            key = httpx.post(f"{url}/v1/admin/tenants", json={"tenant_id": "load"}, headers=admin).json()["api_key"]
            g = torch.Generator().manual_seed(0)
            names = []
            for i in range(4):  # prefixes of 16 virtual tokens, small random K/V
                kv = torch.randn(kv_shape, generator=g) * 0.5
                r = httpx.put(f"{url}/v1/prefixes/load-{i}", headers={"Authorization": f"Bearer {key}"},
                              files={"file": ("p.safetensors", save({"prefix_kv": kv}))}, timeout=60)
                r.raise_for_status()
                names.append(f"load-{i}")
            load = Load(tuple(names) + (None,), PROMPTS, args.max_tokens)
            result = asyncio.run(run(url, key, load, proc.pid, max_num_seqs=args.max_num_seqs,
                                     max_queue=args.max_queue, factor=args.factor, duration_s=duration))
        finally:
            proc.terminate()
            proc.wait(60)
    result["setup"] = {"model": "SmolLM2-135M-Instruct", "dtype": args.dtype, "max_num_seqs": args.max_num_seqs,
                       "max_queue": args.max_queue, "max_tokens": args.max_tokens, "prefixes": 4,
                       "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared with other work",
                       "client": "httpx, in this process, on the same cores as the server"}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
