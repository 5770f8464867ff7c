"""Tenants sharing one server, through HTTP (a real `prefix-serve serve`, SmolLM2 in bfloat16,
its default batch of 128 requests or --max-num-seqs, 1024 tokens a step, and a queue of twice
the batch), with the load generator (bench/loadgen.py). The request counts below are for the
default batch and scale with it.

    .venv/bin/python bench/tenant_bench.py            # about 7 minutes
    .venv/bin/python bench/tenant_bench.py --quick    # smoke run

1. Light tenant's time to first token (TTFT). A light tenant sends streamed requests on
   schedule (open loop, --light-rate a second: 32-token prompts, 32 new tokens) beside a
   heavy tenant's closed loop (32-token prompts, 48 new tokens):
   - "fits": the heavy tenant keeps 120 requests in flight: they fit the batch beside the light one;
   - "queues": it keeps 384 in flight: three batches' worth, so its requests queue (and once the
     engine's queue is full, the heavy tenant's surplus gets 429 from its share of it).
   Target: the light tenant's median TTFT in "queues" within 1.5x of "fits", and no 429 for it.
2. Backlogged tenants: two tenants keep 192 requests each in flight, of opposite shapes
   (one 256-token prompts and 8 new tokens, the other 16-token prompts and 128 new tokens);
   the tokens served to each (prompt tokens when their first token came, new tokens as they
   came) over the window after a warm-up. Target: within 10% of each other.
3. A long prompt: tenant A sends an 8,000-token prompt (1 new token); while it prefills,
   tenant B sends a 1-token request every second. B's latencies (target: each within 2 s),
   and A's time against A alone (what the chunking costs A).
Writes bench/results/tenant_bench.json. The machine is shared with other work: compare
numbers within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from loadgen import Stream, run_load, summary, tokens_in_window  # noqa: E402
from serving_bench import ADMIN_KEY, free_port, start_server  # noqa: E402

def random_ids(n: int, seed: int, vocab: int = 49152) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (n,), generator=g).tolist()


def body(prompt_len: int, new_tokens: int, seed_base: int):
    return lambda i: {"prompt": random_ids(prompt_len, seed_base + i), "max_tokens": new_tokens,
                      "temperature": 0.0, "ignore_eos": True}


def create_tenant(url: str, tenant: str, **limits) -> str:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    r = httpx.post(f"{url}/v1/admin/tenants", json={"tenant_id": tenant}, headers=headers)
    r.raise_for_status()
    key = r.json()["api_key"]
    if limits:
        httpx.put(f"{url}/v1/admin/tenants/{tenant}/limits", json=limits, headers=headers).raise_for_status()
    return key


def wait_idle(url: str, timeout: float = 120.0) -> None:
    """Until the engine runs and queues nothing (the load before was cut off and aborted)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = httpx.get(f"{url}/metrics").text
        busy = [line for line in text.splitlines()
                if line.startswith(("prefix_serve_num_requests_running ", "prefix_serve_num_requests_waiting "))]
        if busy and all(float(line.split()[-1]) == 0 for line in busy):
            return
        time.sleep(0.5)


def light_ttft(url: str, keys: dict, heavy_in_flight: int, light_rate: float, duration: float, warm_up: float) -> dict:
    streams = [Stream("heavy", keys["heavy"], body(32, 48, 10_000_000), concurrency=heavy_in_flight),
               Stream("light", keys["light"], body(32, 32, 20_000_000), rate=light_rate,
                      max_requests=int(light_rate * (duration - warm_up)), start_after_s=warm_up)]
    records = asyncio.run(run_load(url, streams, duration))
    wait_idle(url)
    return {"heavy_in_flight": heavy_in_flight, "light": summary(records, "light"), "heavy": summary(records, "heavy")}


def backlogged(url: str, keys: dict, duration: float, warm_up: float, in_flight: int) -> dict:
    streams = [Stream("long-prompts", keys["long-prompts"], body(256, 8, 30_000_000), concurrency=in_flight),
               Stream("long-answers", keys["long-answers"], body(16, 128, 40_000_000), concurrency=in_flight)]
    records = asyncio.run(run_load(url, streams, duration))
    wait_idle(url)
    served = {s.name: tokens_in_window(records, s.name, warm_up, duration) for s in streams}
    spread = (max(served.values()) - min(served.values())) / max(served.values())
    return {"window_s": duration - warm_up, "tokens_served": served, "spread": spread,
            "target": 0.10, "target_met": spread <= 0.10,
            "summaries": {s.name: summary(records, s.name) for s in streams}}


def long_prompt(url: str, keys: dict, prompt_len: int, timeout: float) -> dict:
    a_body = {"prompt": random_ids(prompt_len, 7), "max_tokens": 1, "ignore_eos": True}

    def a_alone() -> float:
        t0 = time.perf_counter()
        httpx.post(f"{url}/v1/generate", json=a_body, headers={"Authorization": f"Bearer {keys['a']}"},
                   timeout=timeout).raise_for_status()
        return time.perf_counter() - t0

    alone = a_alone()
    wait_idle(url)
    streams = [Stream("A", keys["a"], lambda i: a_body, concurrency=1, max_requests=1),
               Stream("B", keys["b"], body(16, 1, 50_000_000), rate=1.0, max_requests=int(alone * 1.5) + 5,
                      start_after_s=2.0)]
    records = asyncio.run(run_load(url, streams, timeout))
    wait_idle(url)
    a = next(r for r in records if r.stream == "A")
    during = [r for r in records if r.stream == "B" and r.start < a.end]
    latencies = [r.latency for r in during if r.status == 200]
    return {"prompt_tokens": prompt_len, "a_alone_s": alone, "a_beside_b_s": a.latency,
            "a_beside_b_vs_alone": a.latency / alone, "b_requests_during_a": len(during),
            "b_latency_s": {"p50": statistics.median(latencies), "max": max(latencies)} if latencies else None,
            "b_status": sorted({r.status for r in during}), "target_s": 2.0,
            "target_met": bool(latencies) and max(latencies) <= 2.0 and len(latencies) == len(during)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--duration", type=float, default=50.0, help="seconds of each TTFT phase")
    ap.add_argument("--light-rate", type=float, default=2.0)
    ap.add_argument("--backlog-duration", type=float, default=70.0)
    ap.add_argument("--long-prompt", type=int, default=8000)
    ap.add_argument("--max-num-seqs", type=int, default=128, help="the server's batch (serve's default: 128)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "tenant_bench.json"))
    args = ap.parse_args()
    if args.quick:
        args.duration, args.backlog_duration, args.long_prompt = 15.0, 15.0, 1500

    from prefix_store.redis_process import RedisServer

    report: dict = {}
    with tempfile.TemporaryDirectory() as tmp, RedisServer(datadir=Path(tmp) / "redis") as redis_server:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        from server.cache_dir import default_cache_dir

        seqs = args.max_num_seqs
        proc = start_server(redis_server.url, args.dtype, port, str(default_cache_dir()),
                            flags=("--max-num-seqs", str(seqs), "--max-queue", str(2 * seqs)))
        try:
            room = {"max_concurrent_requests": 1000}  # each tenant's own cap out of the way: the engine's queue decides
            keys = {t: create_tenant(url, t, **room) for t in ("heavy", "light", "long-prompts", "long-answers", "a", "b")}
            warm = max(5.0, args.duration / 5)
            fits = light_ttft(url, keys, seqs - max(1, seqs // 16), args.light_rate, args.duration, warm)
            print("heavy fits:", json.dumps(fits), flush=True)
            queues = light_ttft(url, keys, 3 * seqs, args.light_rate, args.duration, warm)
            print("heavy queues:", json.dumps(queues), flush=True)
            if queues["light"]["ttft_s"] is None or fits["light"]["ttft_s"] is None:
                raise SystemExit("the light tenant got no first token in a phase (see the summaries above)")
            ratio = queues["light"]["ttft_s"]["p50"] / fits["light"]["ttft_s"]["p50"]
            report["light_ttft"] = {"fits": fits, "queues": queues, "median_ttft_ratio": ratio, "target": 1.5,
                                    "target_met": ratio <= 1.5 and queues["light"]["status_429"] == 0}
            report["backlogged_tokens"] = backlogged(url, keys, args.backlog_duration, args.backlog_duration / 4,
                                                     3 * seqs // 2)
            report["long_prompt"] = long_prompt(url, keys, args.long_prompt, timeout=600)
        finally:
            proc.terminate()
            proc.wait(60)
    report["setup"] = {"model": "SmolLM2-135M-Instruct", "dtype": args.dtype, "max_num_seqs": args.max_num_seqs,
                       "max_queue": 2 * args.max_num_seqs, "light_rate_per_s": args.light_rate,
                       "phase_s": args.duration, "backlog_s": args.backlog_duration,
                       "server": "serve defaults otherwise (max_num_batched_tokens 1024, "
                                 "prefill_attention_budget 1048576)",
                       "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, shared with other work",
                       "date": time.strftime("%Y-%m-%d %H:%M")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    lt, bt, lp = report["light_ttft"], report["backlogged_tokens"], report["long_prompt"]
    print(f"light TTFT p50: {lt['fits']['light']['ttft_s']['p50'] * 1e3:.0f} ms when heavy fits, "
          f"{lt['queues']['light']['ttft_s']['p50'] * 1e3:.0f} ms when heavy queues ({lt['median_ttft_ratio']:.2f}x, "
          f"target 1.5x); light 429s: {lt['queues']['light']['status_429']}, heavy 429s: "
          f"{lt['queues']['heavy']['status_429']}")
    print(f"backlogged tokens: {bt['tokens_served']} (spread {bt['spread']:.1%}, target 10%)")
    print(f"long prompt: A {lp['a_beside_b_s']:.1f} s beside B ({lp['a_beside_b_vs_alone']:.2f}x alone); "
          f"B latency {lp['b_latency_s']} over {lp['b_requests_during_a']} requests (target 2 s)")


if __name__ == "__main__":
    main()
