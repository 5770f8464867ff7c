"""Micro-benchmark of prefix attention on SmolLM2-sized steps: the torch reference and the
C++ CPU kernels (kernels/cpu_attention.py, on the head-major cache layout the engine
keeps), and on CUDA the Triton kernel next to the torch path.

    .venv/bin/python bench/kernel_bench.py [--iters 50] [--out bench/results/kernel_bench.json]

Shapes are one layer of SmolLM2-135M (9 query heads, 3 kv heads, head_dim 64) in a paged
pool of 16-slot blocks, every request on its own 16-token prefix:
  decode: 64 requests, one new token each, ~100 tokens of context (prefix included);
  mixed:  one 256-token prefill chunk beside 63 such decodes.
Per-call times are medians over --iters calls with the step's plan already built (a plan
is built once per step and shared by all 30 layers); plan_us is that one-off cost.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from kernels import cpu_attention, cpu_ops, torch_attention  # noqa: E402
from kernels.attention_metadata import AttentionMetadata  # noqa: E402

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 9, 3, 64
BLOCK_SIZE, PREFIX_LEN, NUM_REQUESTS = 16, 16, 64


def make_step(q_lens: list[int], own_lens: list[int], dtype: torch.dtype, device: str, seed: int = 0,
              head_major: bool = False):
    """A pool holding every request's prefix and own blocks in shuffled order, and a query batch."""
    blocks_for = lambda n: -(-n // BLOCK_SIZE)  # noqa: E731  ceil division
    num_blocks = sum(blocks_for(PREFIX_LEN) + blocks_for(n) for n in own_lens)
    free = list(range(num_blocks))
    random.Random(seed).shuffle(free)
    prefix_blocks = [[free.pop() for _ in range(blocks_for(PREFIX_LEN))] for _ in own_lens]
    own_blocks = [[free.pop() for _ in range(blocks_for(n))] for n in own_lens]
    meta = AttentionMetadata.build(q_lens, [PREFIX_LEN] * len(q_lens), prefix_blocks, own_lens,
                                   own_blocks, BLOCK_SIZE, device)
    gen = torch.Generator().manual_seed(seed)
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    v_cache = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    if head_major:  # the engine's layout: each kv head's block rows contiguous, same logical shape
        k_cache = k_cache.transpose(1, 2).contiguous().transpose(1, 2)
        v_cache = v_cache.transpose(1, 2).contiguous().transpose(1, 2)
    q = torch.randn(sum(q_lens), NUM_HEADS, HEAD_DIM, generator=gen).to(device=device, dtype=dtype)
    return q, k_cache, v_cache, meta


def torch_plan(meta: AttentionMetadata):
    return torch_attention.build_plan(meta, meta.seq_lens.device)


def workloads() -> dict[str, tuple[list[int], list[int]]]:
    rng = random.Random(0)
    decode_own = [rng.randint(76, 92) for _ in range(NUM_REQUESTS)]  # + 16 prefix = ~100 context
    return {
        "decode": ([1] * NUM_REQUESTS, decode_own),
        "mixed": ([256] + [1] * (NUM_REQUESTS - 1), [256] + decode_own[1:]),
    }


def median_us(fn: Callable[[], object], iters: int, device: str) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):  # warm-up: compilation, allocator, caches
        fn()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def bench_backend(name: str, attention: Callable, plan_builder: Callable, q_lens: list[int],
                  own_lens: list[int], dtype: torch.dtype, device: str, iters: int,
                  head_major: bool = False) -> tuple[dict, torch.Tensor]:
    q, k_cache, v_cache, meta = make_step(q_lens, own_lens, dtype, device, head_major=head_major)
    scale = HEAD_DIM ** -0.5
    plan_us = median_us(lambda: plan_builder(meta), iters, device)
    out = attention(q, k_cache, v_cache, meta, scale)  # builds and caches meta.plan
    per_call_us = median_us(lambda: attention(q, k_cache, v_cache, meta, scale), iters, device)
    return {"backend": name, "device": device, "dtype": str(dtype).removeprefix("torch."),
            "per_call_us": round(per_call_us, 1), "plan_us": round(plan_us, 1),
            "tokens": len(q), "context_tokens": sum(own_lens) + PREFIX_LEN * len(own_lens)}, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench/results/kernel_bench.json")
    args = parser.parse_args()

    runs: list[dict] = []
    for workload, (q_lens, own_lens) in workloads().items():
        for dtype in (torch.float32, torch.bfloat16):
            ref, ref_out = bench_backend("torch", torch_attention.prefix_attention, torch_plan,
                                         q_lens, own_lens, dtype, "cpu", args.iters)
            runs.append({"workload": workload, **ref})
            print(runs[-1], flush=True)
            if cpu_ops.available():
                cpu, cpu_out = bench_backend("cpu_kernels", cpu_attention.prefix_attention,
                                             cpu_attention.build_prefill_plan, q_lens, own_lens, dtype, "cpu",
                                             args.iters, head_major=True)
                cpu["max_abs_diff_vs_torch"] = (cpu_out.float() - ref_out.float()).abs().max().item()
                cpu["speedup_vs_torch"] = round(ref["per_call_us"] / cpu["per_call_us"], 2)
                runs.append({"workload": workload, **cpu})
                print(runs[-1], flush=True)
        if not torch.cuda.is_available():
            continue
        from kernels import triton_attention

        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            ref, ref_out = bench_backend("torch", torch_attention.prefix_attention, torch_plan,
                                         q_lens, own_lens, dtype, "cuda", args.iters)
            tri, tri_out = bench_backend("triton", triton_attention.prefix_attention,
                                         lambda meta: triton_attention.build_plan(meta, meta.seq_lens.device),
                                         q_lens, own_lens, dtype, "cuda", args.iters)
            tri["max_abs_diff_vs_torch"] = (tri_out.float() - ref_out.float()).abs().max().item()
            tri["speedup_vs_torch"] = round(ref["per_call_us"] / tri["per_call_us"], 2)
            runs += [{"workload": workload, **ref}, {"workload": workload, **tri}]
            print(runs[-2], runs[-1], sep="\n", flush=True)

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    report = {
        "benchmark": "prefix attention, one SmolLM2-135M layer",
        "shape": {"num_heads": NUM_HEADS, "num_kv_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM,
                  "block_size": BLOCK_SIZE, "prefix_len": PREFIX_LEN, "num_requests": NUM_REQUESTS},
        "host": {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
                 "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "versions": {"torch": torch.__version__, "triton": triton_version},
        "iters": args.iters,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
