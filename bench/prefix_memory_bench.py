"""Bytes one resident prefix takes in each tier, measured, and how many fit in 1 GiB.

    Redis   used_memory growth of a real redis-server per prefix put through PrefixStore
            (the float32 safetensors bytes, the record, the id index), with the copy in the
            serving dtype that an HTTP upload stores beside it (`redis`) and without it
    host    Prefix.nbytes of the engine's host copy (the serving dtype), what HostPrefixes
            counts against its budget
    device  the KV-pool blocks a resident prefix holds (whole blocks of block_size tokens)
            times the pool's bytes per block, read from the engine after serving a request
            on every prefix

On the embedded SmolLM2-135M-Instruct (30 layers, 3 kv heads, head_dim 64), P = 16 by
default (issue 21's case). Writes bench/results/prefix_memory_bench.json.

    .venv/bin/python bench/prefix_memory_bench.py [--prefixes 64] [--length 16]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import redis
import torch

from prefix_store import PrefixStore
from prefix_store.redis_process import RedisServer
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.model_loader import load_model
from server.engine.sampling_params import SamplingParams
from server.prefix import PrefixRef

GIB = 1 << 30
RESULTS = Path(__file__).parent / "results" / "prefix_memory_bench.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefixes", type=int, default=64)
    ap.add_argument("--length", type=int, default=16, help="num_virtual_tokens P")
    args = ap.parse_args()
    torch.manual_seed(0)
    m = load_model()
    engine = LLMEngine(m.model, m.tokenizer, EngineConfig(kv_cache_bytes=256 * 2**20))
    spec = engine.spec
    kvs = [torch.randn(spec.kv_shape(args.length)) * 0.5 for _ in range(args.prefixes)]

    with RedisServer() as server:
        store = PrefixStore(server.url, namespace="membench")
        r = redis.Redis.from_url(server.url)
        store.put("acme", "warmup", kvs[0], model_fingerprint=spec.fingerprint)  # keys, scripts, tenant
        before = int(r.info("memory")["used_memory"])
        records = [store.put("acme", f"p{i}", kv, model_fingerprint=spec.fingerprint)[0] for i, kv in enumerate(kvs)]
        redis_bytes = (int(r.info("memory")["used_memory"]) - before) / args.prefixes
        # as an upload through HTTP stores it: the float32 tensor and its copy in the serving dtype
        before = int(r.info("memory")["used_memory"])
        for i, kv in enumerate(kvs):
            store.put("acme", f"s{i}", kv, model_fingerprint=spec.fingerprint, serving_dtype=engine.dtype)
        redis_served_bytes = (int(r.info("memory")["used_memory"]) - before) / args.prefixes
        store.close()
        r.close()

    prefixes = [engine.make_prefix(kv, (PrefixRef("acme", rec.prefix_id, rec.version),))
                for kv, rec in zip(kvs, records)]
    host_bytes = sum(p.nbytes for p in prefixes) / args.prefixes
    prompt = m.tokenizer("Hello")["input_ids"]
    for i, p in enumerate(prefixes):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=1, temperature=0.0), p)
    while engine.has_unfinished():
        engine.step()
    resident = [engine.kv.prefixes.get(p.key) for p in prefixes]
    assert all(resident), f"{sum(map(bool, resident))} of {args.prefixes} prefixes stayed resident"
    cache = engine.runner.kv_cache
    block_bytes = cache.numel() // cache.shape[2] * cache.element_size()
    device_bytes = sum(len(e.blocks) for e in resident) * block_bytes / args.prefixes

    tiers = {"redis": redis_served_bytes, "redis_float32_only": redis_bytes, "host": host_bytes,
             "device": device_bytes}
    result = {
        "model": "SmolLM2-135M-Instruct", "num_virtual_tokens": args.length, "prefixes": args.prefixes,
        "shape": list(spec.kv_shape(args.length)), "serving_dtype": str(engine.dtype).removeprefix("torch."),
        "stored_dtype": "float32, plus a copy in the serving dtype (redis); float32 alone (redis_float32_only)", "block_size": engine.config.block_size,
        "bytes_per_prefix": {k: round(v) for k, v in tiers.items()},
        "prefixes_per_gib": {k: int(GIB // v) for k, v in tiers.items()},
        "when": time.strftime("%Y-%m-%d"),
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
