"""Prompt prefixes: 1,000-token system prompts sent in full with every request, against the
same prompts stored once as prompt prefixes (PUT /v1/prefixes/{id} {"text": ...}).

    .venv/bin/python bench/prompt_prefix_bench.py           # SmolLM2, bfloat16
    .venv/bin/python bench/prompt_prefix_bench.py --quick   # smoke run

8 tenants, each with its own system prompt of --system-tokens tokens (E2E references
strung together, a different stretch per tenant). 64 concurrent streaming clients, 8 per
tenant, each sending one request: its tenant's system prompt and a short question (token
ids), --new-tokens greedy tokens, EOS ignored. Both runs go through HTTP to one
`prefix-serve serve` process:
  full:   prompt = system prompt ++ question, no prefix
  prefix: prefix_id = the tenant's prompt prefix, prompt = the question
Reported: time to first token (p50, p99), output tokens/s over the run, prompt tokens the
server prefilled, and how many requests gave the same tokens both ways (bfloat16 rounds
differently when the system prompt is computed in another chunk shape: near ties can flip).
Writes bench/results/prompt_prefix_bench.json.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from http_client import RawClient  # noqa: E402
from serving_bench import ADMIN_KEY, free_port, percentile, start_server  # noqa: E402

E2E = ROOT.parent / "shared" / "data" / "e2e" / "devset.csv"
QUESTIONS = ["Which of these places would you recommend for a family dinner, and why?",
             "Summarise the cheapest option in one sentence.", "Which place is near the river?",
             "Is there a coffee shop with a high customer rating?", "Name one restaurant serving Italian food.",
             "Where can I eat in the city centre?", "Which venue is not family-friendly?",
             "List two places with a low price range."]


def system_prompts(tokenizer, count: int, tokens: int) -> list[list[int]]:
    with open(E2E, newline="", encoding="utf-8") as f:
        refs = [row["ref"].strip() for row in csv.DictReader(f)]
    out = []
    for t in range(count):
        text, i = f"You answer questions about these restaurants (list {t + 1}).\n", 97 * t
        ids: list[int] = []
        while len(ids) < tokens:
            text += refs[i % len(refs)] + "\n"
            i += 1
            ids = tokenizer(text)["input_ids"]
        out.append(ids[:tokens])
    return out


async def run(port: int, keys: list[str], systems: list[list[int]], questions: list[list[int]], per_tenant: int,
              new_tokens: int, with_prefix: bool) -> dict:
    ttft: list[float] = []
    tokens: dict[tuple[int, int], list[int]] = {}

    async def one(t: int, k: int) -> None:
        http = RawClient("127.0.0.1", port, keys[t])
        q = questions[(t + k) % len(questions)]
        body = {"max_tokens": new_tokens, "ignore_eos": True, "stream": True}
        body.update({"prefix_id": "system", "prompt": q} if with_prefix else {"prompt": systems[t] + q})
        start = time.perf_counter()
        got: list[int] = []
        async for event in http.events("/v1/generate", body):
            if "error" in event:
                raise RuntimeError(event["error"])
            if event["token_ids"] and not got:
                ttft.append(time.perf_counter() - start)
            got += event["token_ids"]
        tokens[(t, k)] = got
        await http.close()

    t0 = time.perf_counter()
    await asyncio.gather(*[one(t, k) for t in range(len(keys)) for k in range(per_tenant)])
    dt = time.perf_counter() - t0
    n = sum(map(len, tokens.values()))
    return {"seconds": dt, "output_tokens_per_s": n / dt,
            "ttft_ms": {"p50": percentile(ttft, 50) * 1e3, "p99": percentile(ttft, 99) * 1e3},
            "prompt_tokens_prefilled": sum(len(questions[(t + k) % len(questions)]) +
                                           (0 if with_prefix else len(systems[t]))
                                           for t in range(len(keys)) for k in range(per_tenant)),
            "_tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tenants", type=int, default=8)
    ap.add_argument("--per-tenant", type=int, default=8)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "prompt_prefix_bench.json"))
    args = ap.parse_args()
    if args.quick:
        args.tenants, args.per_tenant, args.system_tokens, args.new_tokens = 2, 2, 200, 4

    from transformers import AutoTokenizer

    from prefix_store.redis_process import RedisServer
    from server.cache_dir import default_cache_dir
    from server.engine.model_loader import ensure_default_model

    tokenizer = AutoTokenizer.from_pretrained(ensure_default_model())
    systems = system_prompts(tokenizer, args.tenants, args.system_tokens)
    questions = [tokenizer(q, add_special_tokens=False)["input_ids"] for q in QUESTIONS]
    with tempfile.TemporaryDirectory() as tmp, RedisServer(datadir=Path(tmp) / "redis") as redis_server:
        port = free_port()
        proc = start_server(redis_server.url, args.dtype, port, str(default_cache_dir()))
        try:
            url = f"http://127.0.0.1:{port}"
            admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
            keys = [httpx.post(f"{url}/v1/admin/tenants", json={"tenant_id": f"t{t}"}, headers=admin).json()["api_key"]
                    for t in range(args.tenants)]
            created = []
            for key, ids in zip(keys, systems):
                start = time.perf_counter()
                r = httpx.put(f"{url}/v1/prefixes/system", headers={"Authorization": f"Bearer {key}"},
                              json={"text": tokenizer.decode(ids)}, timeout=600)
                r.raise_for_status()
                created.append((time.perf_counter() - start, r.json()["num_virtual_tokens"]))
            # warm-up: each tenant's prefix loaded once, the kernels built
            asyncio.run(run(port, keys, systems, questions, 1, 2, True))
            asyncio.run(run(port, keys, systems, questions, 1, 2, False))
            full = asyncio.run(run(port, keys, systems, questions, args.per_tenant, args.new_tokens, False))
            prefix = asyncio.run(run(port, keys, systems, questions, args.per_tenant, args.new_tokens, True))
        finally:
            proc.terminate()
            proc.wait(60)
    same = sum(full["_tokens"][k] == prefix["_tokens"][k] for k in full["_tokens"])
    for r in (full, prefix):
        del r["_tokens"]
    report = {
        "workload": {"model": "SmolLM2-135M-Instruct", "dtype": args.dtype, "tenants": args.tenants,
                     "requests_per_tenant": args.per_tenant, "concurrent_requests": args.tenants * args.per_tenant,
                     "system_prompt_tokens": args.system_tokens, "new_tokens": args.new_tokens},
        "create_prompt_prefix": {"seconds_each": [round(s, 3) for s, _ in created],
                                 "tokens_each": [n for _, n in created]},
        "system_prompt_in_full": full, "prompt_prefix": prefix,
        "prefix_vs_full": {"ttft_p50": prefix["ttft_ms"]["p50"] / full["ttft_ms"]["p50"],
                           "ttft_p99": prefix["ttft_ms"]["p99"] / full["ttft_ms"]["p99"],
                           "throughput": prefix["output_tokens_per_s"] / full["output_tokens_per_s"]},
        "same_tokens_both_ways": f"{same} of {len(keys) * args.per_tenant}",
        "machine": {"cpu": platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for name, r in (("system prompt in full", full), ("prompt prefix", prefix)):
        print(f"{name}: TTFT p50 {r['ttft_ms']['p50']:.0f} ms, p99 {r['ttft_ms']['p99']:.0f} ms; "
              f"{r['output_tokens_per_s']:.1f} output tok/s; {r['prompt_tokens_prefilled']} prompt tokens prefilled")
    print(f"ratios (prefix / full): {report['prefix_vs_full']}; same tokens: {report['same_tokens_both_ways']}")


if __name__ == "__main__":
    main()
