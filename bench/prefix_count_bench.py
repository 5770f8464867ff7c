"""Many prefixes: throughput and latency through HTTP with 1, 64, 512 and 4,096 distinct
prefixes in flight, on a working set larger than the device and host budgets, so that
prefixes stream from Redis (as S-LoRA's throughput-against-adapter-count figure).

    .venv/bin/python bench/prefix_count_bench.py            # about 20 minutes
    .venv/bin/python bench/prefix_count_bench.py --quick    # smoke run

A real `prefix-serve serve` (SmolLM2, bfloat16) with small budgets: a KV pool of 160 MiB
(455 blocks of 16 tokens; 64 requests in flight hold up to 320 of them, so about 135
prefixes stay resident) and 24 MiB of host memory for prefixes (68 of them). Each prefix
is 16 virtual tokens (360 KiB in bfloat16); 4,096 of them (1.4 GiB) are stored in Redis.
64 clients in a closed loop (bench/loadgen.py) each send requests one after another,
streamed: a random 24-40-token prompt, 32 new tokens (greedy, EOS ignored), on a prefix
drawn at random from the first N. Each point starts with 64 short requests on its
prefixes; the points run twice, in the order 1, 64, 512, 4096, 4096, 512, 64, 1, and the
two runs of a point are averaged. Target: at most 10% less throughput at 4,096 than at 1.

Then a storm of cold prefixes beside warm traffic: a warm tenant sends two requests a second,
Poisson arrivals, to one resident prefix (streamed, TTFT measured) while 96 other clients request prefixes
drawn from all 4,096 (almost every one a load from Redis); against the same warm tenant
beside 96 clients on one resident prefix; the two alternate twice, pooled. Loads run at most `prefix_load_concurrency` (4)
at a time; the storm is run again with 64 at a time to show what the cap buys.
Writes bench/results/prefix_count_bench.json and bench/results/prefix_count.png. The
machine is shared with other work: compare numbers within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
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

from engine_bench import cpu_model  # noqa: E402
from loadgen import Stream, run_load, summary  # noqa: E402
from serving_bench import ADMIN_KEY, free_port, start_server  # noqa: E402

MiB = 1 << 20
PREFIX_LEN = 16
KV_CACHE_BYTES = 160 * MiB
HOST_CACHE_BYTES = 24 * MiB


def scrape(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("prefix_serve_") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def random_prefix(g: torch.Generator) -> torch.Tensor:
    """A SmolLM2-135M prefix (30 layers, 3 KV heads of 64), bfloat16: [L, 2, Hkv, P, hd]."""
    return (torch.randn(30, 2, 3, PREFIX_LEN, 64, generator=g) * 0.5).to(torch.bfloat16)


def upload(url: str, key: str, prefix_id: str, kv: torch.Tensor) -> None:
    from safetensors.torch import save

    httpx.put(f"{url}/v1/prefixes/{prefix_id}", headers={"Authorization": f"Bearer {key}"},
              files={"file": ("p.safetensors", save({"prefix_kv": kv}))}, timeout=60).raise_for_status()


def store_prefixes(url: str, redis_url: str, key: str, count: int, dtype: str) -> None:
    """`count` random prefixes for tenant `bench`: the first through HTTP (the store then
    knows the model's fingerprint), the others straight into the same Redis, each with its
    serving copy in `dtype` as an upload through HTTP stores it."""
    from prefix_store import PrefixStore

    g = torch.Generator().manual_seed(0)
    upload(url, key, "p0", random_prefix(g))
    store = PrefixStore(redis_url)
    fingerprint = store.get_record("bench", "p0").model_fingerprint
    for i in range(1, count):
        store.put("bench", f"p{i}", random_prefix(g), model_fingerprint=fingerprint, serving_dtype=getattr(torch, dtype))
    store.close()


def request_body(num_prefixes: int, seed: int, new_tokens: int):
    def body(i: int) -> dict:
        rng = random.Random(seed * 1_000_003 + i)
        prompt = [rng.randrange(100, 49152) for _ in range(rng.randint(24, 40))]
        return {"prefix_id": f"p{rng.randrange(num_prefixes)}", "prompt": prompt, "max_tokens": new_tokens,
                "temperature": 0.0, "ignore_eos": True}
    return body


def point(url: str, key: str, num_prefixes: int, clients: int, per_client: int, new_tokens: int, seed: int) -> dict:
    warm = [Stream("warm-up", key, request_body(num_prefixes, seed + 500, 4), concurrency=clients,
                   max_requests=clients)]
    asyncio.run(run_load(url, warm, 300))
    before = scrape(url)
    stream = Stream("bench", key, request_body(num_prefixes, seed, new_tokens), concurrency=clients,
                    max_requests=clients * per_client)
    t0 = time.perf_counter()
    records = asyncio.run(run_load(url, [stream], 600))
    wall = time.perf_counter() - t0
    after = scrape(url)
    s = summary(records, "bench")
    assert s["ok"] == clients * per_client, s
    ttfts = sorted(r.ttft for r in records)
    delta = {k.removeprefix("prefix_serve_").removesuffix("_total"): after.get(k, 0) - before.get(k, 0)
             for k in ("prefix_serve_device_prefix_cache_hits_total", "prefix_serve_device_prefix_cache_misses_total",
                       "prefix_serve_host_prefix_cache_hits_total", "prefix_serve_host_prefix_cache_misses_total",
                       "prefix_serve_preemptions_total")}
    return {"prefixes": num_prefixes, "tokens_per_s": s["output_tokens"] / wall, "wall_s": wall,
            "ttft_ms": {"p50": statistics.median(ttfts) * 1e3, "p99": ttfts[int(0.99 * (len(ttfts) - 1))] * 1e3},
            "latency_s": s["latency_s"], "server": delta}


def storm(url: str, keys: dict, cold_prefixes: int, duration: float, new_tokens: int, rounds: int = 2) -> dict:
    """The warm tenant's TTFT beside 96 clients on cold prefixes, and beside 96 on a warm one.

    The warm tenant's requests arrive as a Poisson process (2 a second), so they sample every
    phase of the step cycle; the two conditions alternate for `rounds` rounds and each one's
    warm requests are pooled across its rounds."""
    rate = 2.0
    pooled: dict[str, dict[str, list]] = {}
    for r in range(rounds):
        for kind, n in (("beside_warm_load", 1), ("beside_cold_storm", cold_prefixes)):
            streams = [Stream("load", keys["bench"], request_body(n, 77 + r, new_tokens), concurrency=96),
                       Stream("warm", keys["warm"], lambda i: {"prefix_id": "w0", "prompt": [100 + i % 50] * 24,
                                                               "max_tokens": 8, "ignore_eos": True},
                              rate=rate, poisson_seed=1000 * r + n, max_requests=int((duration - 8) * rate),
                              start_after_s=5.0)]
            records = asyncio.run(run_load(url, streams, duration))
            runs = pooled.setdefault(kind, {"records": [], "rounds": []})
            runs["records"] += records
            runs["rounds"].append(summary(records, "warm")["ttft_s"])
            time.sleep(3)
    out = {kind: {"warm": summary(p["records"], "warm"), "load": summary(p["records"], "load"),
                  "warm_ttft_s_per_round": p["rounds"]} for kind, p in pooled.items()}
    out["warm_arrivals"] = f"Poisson, {rate:g}/s, {rounds} rounds of {duration:g} s per condition, pooled"
    cold, warm = (out[k]["warm"]["ttft_s"] for k in ("beside_cold_storm", "beside_warm_load"))
    # None when the warm tenant got no first token within the duration (a machine too slow for it)
    out["warm_ttft_ratio"] = cold["p50"] / warm["p50"] if cold and warm else None
    out["warm_ttft_ratio_p90"] = cold["p90"] / warm["p90"] if cold and warm else None
    return out


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p["prefixes"] for p in points]
    ys = [p["tokens_per_s"] for p in points]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    ax.plot(xs, ys, "o-", color="tab:blue", label="prefix-serve, through HTTP")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_ylim(0, max(ys) * 1.15)
    ax.axhline(ys[0] * 0.9, color="gray", linestyle=":", label="90% of 1 prefix (target)")
    ax.set_xlabel("distinct prefixes in flight")
    ax.set_ylabel("output tokens/s")
    ax.set_title("SmolLM2-135M, CPU (2 shared cores), 64 clients", fontsize=9)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--counts", default="1,64,512,4096")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--per-client", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--storm-duration", type=float, default=45.0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--storm-only", action="store_true", help="skip the throughput points")
    ap.add_argument("--no-cap-64", action="store_true", help="skip the storm with 64 loads at a time")
    ap.add_argument("--kv-cache-bytes", type=int, default=KV_CACHE_BYTES)
    ap.add_argument("--kv-reserve-fraction", type=float, default=None,
                    help="the server's --kv-reserve-fraction (default: the server's own)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "prefix_count_bench.json"))
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    if args.quick:
        counts, args.clients, args.per_client, args.new_tokens, args.storm_duration = [1, 64, 256], 16, 2, 8, 12.0

    from prefix_store.redis_process import RedisServer
    from server.cache_dir import default_cache_dir

    report: dict = {"points": []}
    flags = ("--kv-cache-bytes", str(args.kv_cache_bytes), "--host-cache-bytes", str(HOST_CACHE_BYTES),
             "--max-queue", "1024")
    if args.kv_reserve_fraction is not None:
        flags += ("--kv-reserve-fraction", str(args.kv_reserve_fraction))
    with tempfile.TemporaryDirectory() as tmp, RedisServer(datadir=Path(tmp) / "redis") as redis_server:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(redis_server.url, args.dtype, port, str(default_cache_dir()), flags)
        try:
            admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
            keys = {}
            for tenant in ("bench", "warm"):
                keys[tenant] = httpx.post(f"{url}/v1/admin/tenants", json={"tenant_id": tenant},
                                          headers=admin).json()["api_key"]
                httpx.put(f"{url}/v1/admin/tenants/{tenant}/limits", headers=admin,
                          json={"max_prefixes": 10_000, "max_concurrent_requests": 1000}).raise_for_status()
            t0 = time.perf_counter()
            store_prefixes(url, redis_server.url, keys["bench"], max(counts), args.dtype)
            upload(url, keys["warm"], "w0", random_prefix(torch.Generator().manual_seed(1)))
            report["stored_prefixes_s"] = time.perf_counter() - t0
            runs: dict[int, list[dict]] = {n: [] for n in counts}
            for run, n in enumerate([] if args.storm_only else counts + counts[::-1]):  # a seed per run: the second run of a point
                # draws other prefixes than the first, so it does not find the first run's resident
                result = point(url, keys["bench"], n, args.clients, args.per_client, args.new_tokens, seed=n * 100 + run)
                runs[n].append(result)
                print(f"{n} prefixes: {result['tokens_per_s']:.1f} tok/s, TTFT p50 {result['ttft_ms']['p50']:.0f} ms, "
                      f"server {result['server']}", flush=True)
            report["storm_cap_4"] = storm(url, keys, max(counts), args.storm_duration, args.new_tokens)
        finally:
            proc.terminate()
            proc.wait(60)
        if not args.no_cap_64:  # the same storm with 64 loads at a time
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc = start_server(redis_server.url, args.dtype, port, str(default_cache_dir()),
                                flags + ("--prefix-load-concurrency", "64"))
            try:
                report["storm_cap_64"] = storm(url, keys, max(counts), args.storm_duration, args.new_tokens)
            finally:
                proc.terminate()
                proc.wait(60)

    for n in [] if args.storm_only else counts:
        both = runs[n]
        report["points"].append({
            "prefixes": n, "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in both),
            "runs_tokens_per_s": [r["tokens_per_s"] for r in both],
            "ttft_ms_p50": statistics.mean(r["ttft_ms"]["p50"] for r in both),
            "ttft_ms_p99": statistics.mean(r["ttft_ms"]["p99"] for r in both),
            "latency_s_p50": statistics.mean(r["latency_s"]["p50"] for r in both),
            "server": [r["server"] for r in both]})
    if report["points"]:
        base = report["points"][0]["tokens_per_s"]
        for p in report["points"]:
            p["vs_1_prefix"] = p["tokens_per_s"] / base
        last = report["points"][-1]["vs_1_prefix"]
        report["target"] = {"max_loss": 0.10, "loss_at_max": 1 - last, "met": last >= 0.9}
    report["setup"] = {"model": "SmolLM2-135M-Instruct", "dtype": args.dtype, "prefix_len": PREFIX_LEN,
                       "kv_cache_bytes": args.kv_cache_bytes, "host_cache_bytes": HOST_CACHE_BYTES,
                       "kv_reserve_fraction": args.kv_reserve_fraction,
                       "clients": args.clients, "requests_per_point": args.clients * args.per_client,
                       "new_tokens": args.new_tokens, "prompt_tokens": [24, 40],
                       "machine": f"{cpu_model()}, {torch.get_num_threads()} threads",
                       "date": time.strftime("%Y-%m-%d %H:%M")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if report["points"]:
        plot(report["points"], out.with_name("prefix_count.png"))
    for p in report["points"]:
        print(f"{p['prefixes']:>5} prefixes: {p['tokens_per_s']:.1f} tok/s ({p['vs_1_prefix']:.2f}x), "
              f"TTFT p50 {p['ttft_ms_p50']:.0f} ms, p99 {p['ttft_ms_p99']:.0f} ms")
    for cap in [c for c in ("storm_cap_4", "storm_cap_64") if c in report]:
        s = report[cap]
        print(f"{cap}: warm tenant {s['beside_warm_load']['warm']} beside warm load, "
              f"{s['beside_cold_storm']['warm']} beside the cold storm (TTFT ratio {s['warm_ttft_ratio']})")


if __name__ == "__main__":
    main()
