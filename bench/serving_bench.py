"""Serving benchmarks: cold prefix loads, and throughput and latency through HTTP against the
engine alone.

    .venv/bin/python bench/serving_bench.py            # SmolLM2, bfloat16
    .venv/bin/python bench/serving_bench.py --quick    # smoke run

1. Cold prefix load: Redis -> ready on the device, for SmolLM2 with prefix length 16: the
   store read (metadata, then the tensor of that version), the check and the cast to the
   engine dtype (engine.make_prefix), and the copy into KV blocks (DevicePrefixes.acquire).
   Each load is of a prefix that is in neither cache. p50 and p99.
2. Throughput: --clients concurrent clients, each on its own prefix, each sending
   --per-client requests one after another (random 24-40-token prompts as token ids, 64 new
   tokens, greedy, EOS ignored). Before each timed run every client sends one short request,
   so each run starts with its prefixes loaded (cold loads are 1.):
   - the engine alone: the same closed loop on an LLMEngine in a process of its own, with
     nothing else in it (bench/serving_bench.py --engine-alone, started by this script);
   - through HTTP: a `prefix-serve serve` process (as deployed), the clients in this
     process on /v1/generate: JSON responses (the throughput compared), then streamed over
     SSE (tokens/s, and time to first token and time per output token, p50 and p99, as the
     clients see them). The clients (bench/http_client.py: one keep-alive connection each,
     little CPU) share the machine's cores with the server; --client httpx uses httpx.
   Target: HTTP >= 0.9x the engine alone.
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


ADMIN_KEY = "bench-admin-key-0123456789abcdef"
WARM_UP_TOKENS = 4  # before each timed run every client sends one short request on its prefix


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


def engine_alone(spec_path: str) -> None:
    """--engine-alone: the closed loop on an LLMEngine in this process only; prints tokens/s."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.config import Settings
    from server.engine.llm_engine import LLMEngine
    from server.engine.model_loader import ensure_default_model, resolve_dtype
    from server.engine.sampling_params import SamplingParams

    spec = json.loads(Path(spec_path).read_text())
    path = ensure_default_model()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(spec["dtype"], torch.device("cpu"))).eval()
    engine = LLMEngine(model, AutoTokenizer.from_pretrained(path), Settings().engine_config())  # serve's defaults
    kvs = load_file(spec["prefixes"])
    prefixes = [engine.make_prefix(kvs[f"p{c}"]) for c in range(spec["clients"])]
    params = SamplingParams(max_tokens=spec["new_tokens"], ignore_eos=True)
    reqs, clients, per_client = spec["requests"], spec["clients"], spec["per_client"]

    def run(n_clients: int, per: int, params: SamplingParams) -> int:
        sent = dict.fromkeys(range(n_clients), 0)
        for c in sent:
            engine.add_request(f"c{c}-0", reqs[c * per_client], params, prefixes[c])
            sent[c] = 1
        tokens = 0
        while engine.has_unfinished():
            for out in engine.step():
                tokens += len(out.new_token_ids)
                if out.finished:
                    c = int(out.request_id[1:].split("-")[0])
                    if sent[c] < per:  # the client sends its next request
                        engine.add_request(f"c{c}-{sent[c]}", reqs[c * per_client + sent[c]], params, prefixes[c])
                        sent[c] += 1
        return tokens

    run(clients, 1, SamplingParams(max_tokens=WARM_UP_TOKENS, ignore_eos=True))  # warm-up: every prefix loaded
    t0 = time.perf_counter()
    tokens = run(clients, per_client, params)
    print(json.dumps({"tokens_per_s": tokens / (time.perf_counter() - t0), "tokens": tokens}))


class _Httpx:
    """The same two calls as RawClient, through httpx (--client httpx)."""

    def __init__(self, url: str, key: str) -> None:
        import httpx

        self.http = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600)

    async def post_json(self, path: str, body: dict) -> dict:
        r = await self.http.post(path, json=body)
        r.raise_for_status()
        return r.json()

    async def events(self, path: str, body: dict):
        async with self.http.stream("POST", path, json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    yield json.loads(line[6:])

    async def close(self) -> None:
        await self.http.aclose()


async def http_closed_loop(port: int, key: str, reqs, clients: int, per_client: int, new_tokens: int,
                           stream: bool, client_kind: str = "raw") -> dict:
    from http_client import RawClient

    ttft: list[float] = []
    tpot: list[float] = []

    def connect():
        if client_kind == "httpx":
            return _Httpx(f"http://127.0.0.1:{port}", key)
        return RawClient("127.0.0.1", port, key)

    async def one(http, c: int, k: int, record: bool) -> int:
        body = {"prefix_id": f"own-{c}", "prompt": reqs[c * per_client + k], "max_tokens": new_tokens,
                "temperature": 0.0, "ignore_eos": True, "stream": stream}
        if not stream:
            return len((await http.post_json("/v1/generate", body))["token_ids"])
        start = time.perf_counter()
        first = last = None
        n = 0
        async for event in http.events("/v1/generate", body):
            if "error" in event:
                raise RuntimeError(f"stream failed: {event['error']}")
            if got := len(event["token_ids"]):
                last = time.perf_counter()
                first = first or last
                n += got
        if record:
            ttft.append(first - start)
            if n > 1:
                tpot.append((last - first) / (n - 1))
        return n

    async def client(c: int, record: bool) -> int:
        http = connect()
        try:
            return sum([await one(http, c, k, record) for k in range(per_client)])
        finally:
            await http.close()

    async def warm_up(c: int) -> None:  # every client's prefix loaded, as in the engine-alone run
        http = connect()
        body = {"prefix_id": f"own-{c}", "prompt": reqs[c * per_client], "max_tokens": WARM_UP_TOKENS,
                "ignore_eos": True}
        await http.post_json("/v1/generate", body)
        await http.close()

    await asyncio.gather(*[warm_up(c) for c in range(clients)])
    t0 = time.perf_counter()
    tokens = sum(await asyncio.gather(*[client(c, True) for c in range(clients)]))
    dt = time.perf_counter() - t0
    assert tokens == clients * per_client * new_tokens
    if not stream:
        return {"tokens_per_s": tokens / dt}
    return {"tokens_per_s": tokens / dt,
            "ttft_ms": {"p50": percentile(ttft, 50) * 1e3, "p99": percentile(ttft, 99) * 1e3},
            "tpot_ms": {"p50": percentile(tpot, 50) * 1e3, "p99": percentile(tpot, 99) * 1e3}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(redis_url: str, dtype: str, port: int, cache_dir: str,
                 flags: tuple[str, ...] = ("--max-queue", "1024")) -> subprocess.Popen:
    env = {**os.environ, "PREFIX_SERVE_ADMIN_KEY": ADMIN_KEY}
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--redis-url", redis_url,
                             "--port", str(port), "--dtype", dtype, "--workers", "0", *flags,
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


def random_prompts(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Random 24-40-token prompts (token ids), the same in both runs."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab, (int(torch.randint(24, 41, (1,), generator=g)),), generator=g).tolist()
            for _ in range(count)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--per-client", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefix-len", type=int, default=16)
    ap.add_argument("--cold-loads", type=int, default=200)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--client", choices=("raw", "httpx"), default="raw",
                    help="the HTTP client of the load (bench/http_client.py, or httpx)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--engine-alone", metavar="SPEC", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serving_bench.json"))
    args = ap.parse_args()
    if args.engine_alone:
        engine_alone(args.engine_alone)
        return
    if args.quick:
        args.clients, args.per_client, args.new_tokens, args.cold_loads = 8, 1, 8, 20

    import httpx
    from safetensors.torch import save, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefix_store import PrefixStore
    from prefix_store.redis_process import RedisServer
    from server.cache_dir import default_cache_dir
    from server.engine.config import EngineConfig
    from server.engine.llm_engine import LLMEngine
    from server.engine.model_loader import ensure_default_model, resolve_dtype

    path = ensure_default_model()
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    reqs = random_prompts(args.clients * args.per_client, len(tokenizer))
    g = torch.Generator().manual_seed(1)
    report: dict = {}
    with tempfile.TemporaryDirectory() as tmp, RedisServer(datadir=Path(tmp) / "redis") as redis_server:
        store = PrefixStore(redis_server.url)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        engine = LLMEngine(model, tokenizer, EngineConfig())
        report["cold_prefix_load"] = cold_loads(engine, store, args.cold_loads, args.prefix_len)
        kvs = [torch.randn(engine.spec.kv_shape(args.prefix_len), generator=g) for _ in range(args.clients)]
        del engine, model

        # the engine alone, in a process of its own
        save_file({f"p{c}": kv for c, kv in enumerate(kvs)}, f"{tmp}/prefixes.safetensors")
        spec = {"dtype": args.dtype, "clients": args.clients, "per_client": args.per_client,
                "new_tokens": args.new_tokens, "requests": reqs, "prefixes": f"{tmp}/prefixes.safetensors"}
        Path(f"{tmp}/spec.json").write_text(json.dumps(spec))
        done = subprocess.run([sys.executable, __file__, "--engine-alone", f"{tmp}/spec.json"], cwd=ROOT,
                              capture_output=True, text=True, check=True)
        engine_tps = json.loads(done.stdout.strip().splitlines()[-1])["tokens_per_s"]

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
            loads = (port, key, reqs, args.clients, args.per_client, args.new_tokens)
            http = asyncio.run(http_closed_loop(*loads, stream=False, client_kind=args.client))
            streamed = asyncio.run(http_closed_loop(*loads, stream=True, client_kind=args.client))
        finally:
            proc.terminate()
            proc.wait(60)
        store.close()

    ratio = http["tokens_per_s"] / engine_tps
    report["throughput"] = {"engine_alone_tokens_per_s": engine_tps, "http": http, "http_vs_engine": ratio,
                            "target": 0.9, "target_met": ratio >= 0.9, "http_streamed": streamed,
                            "http_streamed_vs_engine": streamed["tokens_per_s"] / engine_tps}
    report["workload"] = {"model": "SmolLM2-135M-Instruct", "dtype": str(dtype).removeprefix("torch."),
                          "clients": args.clients, "requests_per_client": args.per_client,
                          "new_tokens": args.new_tokens, "prefix_len": args.prefix_len,
                          "prompt_tokens": [min(map(len, reqs)), max(map(len, reqs))], "client": args.client}
    report["machine"] = {"cpu": platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                         "cuda": torch.cuda.is_available()}
    report["date"] = time.strftime("%Y-%m-%d %H:%M")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    cl = report["cold_prefix_load"]
    print(f"cold prefix load: p50 {cl['p50_ms']:.2f} ms, p99 {cl['p99_ms']:.2f} ms ({cl['loads']} loads)")
    print(f"engine alone: {engine_tps:.1f} tok/s; through HTTP: {http['tokens_per_s']:.1f} tok/s, "
          f"ratio {ratio:.2f}x (target 0.9x); streamed (SSE): {streamed['tokens_per_s']:.1f} tok/s, "
          f"{streamed['tokens_per_s'] / engine_tps:.2f}x, TTFT p50 {streamed['ttft_ms']['p50']:.0f} ms, "
          f"p99 {streamed['ttft_ms']['p99']:.0f} ms; TPOT p50 {streamed['tpot_ms']['p50']:.1f} ms, "
          f"p99 {streamed['tpot_ms']['p99']:.1f} ms")


if __name__ == "__main__":
    main()
