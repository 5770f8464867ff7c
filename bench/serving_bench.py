"""Serving benchmarks: cold prefix loads, and throughput through HTTP against the engine alone.

    .venv/bin/python bench/serving_bench.py            # SmolLM2, bfloat16
    .venv/bin/python bench/serving_bench.py --quick    # smoke run

1. Cold prefix load (issue 3): Redis -> ready on the device, for SmolLM2 with prefix length
   16: the store read (metadata, then the tensor of that version), validation and the cast
   to the engine dtype (engine.make_prefix), and the copy into KV blocks
   (DevicePrefixes.acquire). Each load is of a prefix that is in neither cache. p50 and p99.
2. Throughput: 32 concurrent clients, each on its own prefix, each sending --per-client
   requests one after another (~32-token prompts, 64 new tokens, greedy, EOS ignored):
   - through HTTP: a `prefix-serve serve` process (its own interpreter, as deployed), with
     the clients in this process over /v1/generate;
   - the engine alone: the same closed loop of 32 callers on an AsyncEngine in this process.
   Target: HTTP >= 0.85x the engine alone.
Writes bench/results/serving_bench.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from engine_bench import prompts  # noqa: E402

ADMIN_KEY = "bench-admin-key-0123456789abcdef"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def cold_loads(engine, store, count: int, prefix_len: int) -> dict:
    from server.prefix import PrefixRef

    g = torch.Generator().manual_seed(0)
    ids = []
    for i in range(count):
        kv = torch.randn(engine.spec.kv_shape(prefix_len), generator=g)
        store.put("bench", f"cold-{i}", kv, model_fingerprint=engine.spec.fingerprint)
        ids.append(f"cold-{i}")
    times = []
    for prefix_id in ids:
        t0 = time.perf_counter()
        record, kv = store.get("bench", prefix_id)
        prefix = engine.make_prefix(kv, (PrefixRef("bench", prefix_id, record.version),))
        entry = engine.kv.prefixes.acquire(prefix)
        t1 = time.perf_counter()
        assert entry is not None
        engine.kv.prefixes.release(prefix.key)
        engine.kv.prefixes.drop(prefix.key)
        times.append(t1 - t0)
    return {"loads": count, "p50_ms": percentile(times, 50) * 1e3, "p99_ms": percentile(times, 99) * 1e3,
            "mean_ms": statistics.mean(times) * 1e3}


async def engine_closed_loop(engine, prefixes, reqs, clients: int, per_client: int, new_tokens: int) -> float:
    from server.engine.async_engine import AsyncEngine
    from server.engine.sampling_params import SamplingParams

    aeng = AsyncEngine(engine, max_waiting=4 * clients)
    await aeng.start()
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)

    async def client(c: int) -> int:
        n = 0
        for k in range(per_client):
            async for out in aeng.generate(f"c{c}-{k}-{time.monotonic_ns()}", reqs[(c * per_client + k) % len(reqs)],
                                           params, prefixes[c]):
                n += len(out.new_token_ids)
        return n

    await asyncio.gather(*[client(c) for c in range(min(clients, 4))])  # warm-up
    t0 = time.perf_counter()
    tokens = sum(await asyncio.gather(*[client(c) for c in range(clients)]))
    dt = time.perf_counter() - t0
    await aeng.shutdown()
    assert tokens == clients * per_client * new_tokens
    return tokens / dt


async def http_closed_loop(url: str, key: str, reqs, clients: int, per_client: int, new_tokens: int) -> float:
    import httpx

    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600,
                                 limits=httpx.Limits(max_connections=clients + 4)) as http:
        async def client(c: int) -> int:
            n = 0
            for k in range(per_client):
                r = await http.post("/v1/generate", json={
                    "prefix_id": f"own-{c}", "prompt": reqs[(c * per_client + k) % len(reqs)],
                    "max_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True})
                r.raise_for_status()
                n += len(r.json()["token_ids"])
            return n

        await asyncio.gather(*[client(c) for c in range(min(clients, 4))])  # warm-up
        t0 = time.perf_counter()
        tokens = sum(await asyncio.gather(*[client(c) for c in range(clients)]))
        dt = time.perf_counter() - t0
    assert tokens == clients * per_client * new_tokens
    return tokens / dt


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(redis_url: str, dtype: str, port: int, cache_dir: str) -> subprocess.Popen:
    env = {**os.environ, "PREFIX_SERVE_ADMIN_KEY": ADMIN_KEY}
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--redis-url", redis_url,
                             "--port", str(port), "--dtype", dtype, "--workers", "0", "--max-queue", "1024",
                             "--cache-dir", cache_dir, "--log-level", "warning"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    import httpx

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
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--per-client", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefix-len", type=int, default=16)
    ap.add_argument("--cold-loads", type=int, default=200)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serving_bench.json"))
    args = ap.parse_args()
    if args.quick:
        args.clients, args.per_client, args.new_tokens, args.cold_loads = 8, 1, 8, 20

    import httpx
    from safetensors.torch import save
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefix_store import PrefixStore
    from prefix_store.redis_process import RedisServer
    from server.engine.config import EngineConfig
    from server.engine.llm_engine import LLMEngine
    from server.cache_dir import default_cache_dir
    from server.engine.model_loader import ensure_default_model, resolve_dtype

    path = ensure_default_model()
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    reqs = prompts(tokenizer, args.clients * args.per_client)
    texts = [tokenizer.decode(r) for r in reqs]
    reqs = [tokenizer(t)["input_ids"] for t in texts]  # what the server's tokenizer will see
    g = torch.Generator().manual_seed(1)
    report: dict = {}
    with tempfile.TemporaryDirectory() as tmp, RedisServer(datadir=Path(tmp) / "redis") as redis_server:
        store = PrefixStore(redis_server.url)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        engine = LLMEngine(model, tokenizer, EngineConfig())
        report["cold_prefix_load"] = cold_loads(engine, store, args.cold_loads, args.prefix_len)
        kvs = [torch.randn(engine.spec.kv_shape(args.prefix_len), generator=g) for _ in range(args.clients)]
        engine = LLMEngine(model, tokenizer, EngineConfig())
        prefixes = [engine.make_prefix(kv) for kv in kvs]
        engine_tps = asyncio.run(engine_closed_loop(engine, prefixes, reqs, args.clients, args.per_client,
                                                    args.new_tokens))
        del engine, model

        port = free_port()
        proc = start_server(redis_server.url, args.dtype, port, str(default_cache_dir()))
        try:
            url = f"http://127.0.0.1:{port}"
            key = httpx.post(f"{url}/v1/admin/tenants", json={"tenant_id": "acme"},
                             headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["api_key"]
            for c, kv in enumerate(kvs):
                r = httpx.put(f"{url}/v1/prefixes/own-{c}", headers={"Authorization": f"Bearer {key}"},
                              files={"file": ("p.safetensors", save({"prefix_kv": kv}))}, timeout=60)
                r.raise_for_status()
            http_tps = asyncio.run(http_closed_loop(url, key, texts, args.clients, args.per_client, args.new_tokens))
        finally:
            proc.terminate()
            proc.wait(60)
        store.close()

    report["throughput"] = {"engine_alone_tokens_per_s": engine_tps, "http_tokens_per_s": http_tps,
                            "http_vs_engine": http_tps / engine_tps, "target": 0.85,
                            "target_met": http_tps / engine_tps >= 0.85}
    report["workload"] = {"model": "SmolLM2-135M-Instruct", "dtype": str(dtype).removeprefix("torch."),
                          "clients": args.clients, "requests_per_client": args.per_client,
                          "new_tokens": args.new_tokens, "prefix_len": args.prefix_len,
                          "prompt_tokens": [min(map(len, reqs)), max(map(len, reqs))]}
    report["machine"] = {"cpu": platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                         "cuda": torch.cuda.is_available()}
    report["date"] = time.strftime("%Y-%m-%d %H:%M")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    cl = report["cold_prefix_load"]
    print(f"cold prefix load: p50 {cl['p50_ms']:.2f} ms, p99 {cl['p99_ms']:.2f} ms ({cl['loads']} loads)")
    print(f"engine alone: {engine_tps:.1f} tok/s; through HTTP: {http_tps:.1f} tok/s; "
          f"ratio {http_tps / engine_tps:.2f}x (target 0.85x)")


if __name__ == "__main__":
    main()
