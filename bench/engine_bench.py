"""Engine throughput against HF transformers + PEFT, in one process, on one workload.

    .venv/bin/python bench/engine_bench.py            # SmolLM2, bfloat16, 64 requests
    .venv/bin/python bench/engine_bench.py --quick    # 16 requests, 16 new tokens (smoke)

Workload (issue 2): SmolLM2-135M-Instruct, 64 requests with ~32-token prompts (E2E meaning
representations), 64 new tokens each (greedy, EOS ignored), prefix length 16.
Systems:
  hf_peft_serial   HF + PEFT, one request at a time (what users do today). Run on a subset
                   (--serial-requests) because it is slow; tokens/s is a rate, so it compares.
  hf_static_batch  HF generate, all requests as one left-padded batch, no prefix.
  engine_shared    prefix-serve, every request on the same prefix.
  engine_own       prefix-serve, every request on its own prefix.
Writes bench/results/engine_bench.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
E2E = ROOT.parent / "shared" / "data" / "e2e" / "devset.csv"


def prompts(tokenizer, n: int, target_len: int = 32) -> list[list[int]]:
    """n prompts of ~target_len tokens (28..36) from E2E meaning representations."""
    mrs = []
    if E2E.exists():
        with E2E.open() as f:
            mrs = list(dict.fromkeys(row["mr"] for row in csv.DictReader(f)))
    if not mrs:
        mrs = [f"name[Place {i}], food[Italian], area[riverside], priceRange[cheap]" for i in range(n)]
    out = []
    for i in range(n):
        ids = tokenizer(f"Describe: {mrs[i % len(mrs)]}\n")["input_ids"]
        want = target_len - 4 + (i % 9)
        while len(ids) < want:
            ids = ids + ids
        out.append(ids[:want])
    return out


def peft_adapters(base, count: int, prefix_len: int, folder: Path) -> list[Path]:
    """Randomly initialised PEFT prefix adapters, saved the way users save them."""
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    model = get_peft_model(base, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=prefix_len))
    paths = []
    for i in range(count):
        torch.manual_seed(1000 + i)
        with torch.no_grad():
            for p in model.prompt_encoder.parameters():
                p.normal_(0.0, 1.0)
        path = folder / f"adapter{i}"
        model.save_pretrained(path)
        paths.append(path)
    return paths


def bench_hf_peft_serial(path, dtype, adapter: Path, reqs: list[list[int]], new_tokens: int) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    model = PeftModel.from_pretrained(base, adapter).eval()

    def one(ids, n):
        x = torch.tensor([ids])
        with torch.inference_mode():
            model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False)

    one(reqs[0], 4)  # warm-up
    t0 = time.perf_counter()
    for ids in reqs:
        one(ids, new_tokens)
    dt = time.perf_counter() - t0
    return {"requests": len(reqs), "seconds": dt, "tokens_per_s": len(reqs) * new_tokens / dt}


def hf_static_batch(model, tokenizer, reqs: list[list[int]], new_tokens: int):
    width = max(len(r) for r in reqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in reqs])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in reqs])

    def run(n: int = new_tokens) -> None:
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=pad)

    run(2)  # warm-up
    return run


def engine_run(engine, prefixes, reqs: list[list[int]], new_tokens: int):
    from server.engine.sampling_params import SamplingParams

    engine.generate(reqs[:4], SamplingParams(max_tokens=2, ignore_eos=True), prefixes[:4])  # warm-up

    def run() -> None:
        done = engine.generate(reqs, SamplingParams(max_tokens=new_tokens, ignore_eos=True), prefixes)
        assert all(len(r.output_token_ids) == new_tokens for r in done)
    return run


def timed(run, repeats: int, tokens: int) -> dict:
    """Median of `repeats` runs: the machine is shared, the median resists outliers."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    return {"seconds_median": med, "seconds_all": times, "tokens_per_s": tokens / med}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefix-len", type=int, default=16)
    ap.add_argument("--serial-requests", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "engine_bench.json"))
    args = ap.parse_args()
    if args.quick:
        args.requests, args.new_tokens, args.serial_requests, args.repeats = 16, 16, 2, 1

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.engine.config import EngineConfig
    from server.engine.llm_engine import LLMEngine
    from server.engine.model_loader import ensure_default_model, resolve_dtype
    from server.prefix.peft_format import read_adapter

    torch.manual_seed(0)
    path = ensure_default_model()
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    reqs = prompts(tokenizer, args.requests)
    results: dict = {}
    tokens = args.requests * args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        adapters = peft_adapters(base, args.requests, args.prefix_len, Path(tmp))
        del base

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        cfg = EngineConfig(max_num_seqs=max(64, args.requests), max_num_batched_tokens=args.max_num_batched_tokens)
        shared_engine, own_engine = LLMEngine(model, tokenizer, cfg), LLMEngine(model, tokenizer, cfg)
        own = [own_engine.make_prefix(read_adapter(a, own_engine.spec)) for a in adapters]
        runs = {
            "engine_shared": engine_run(shared_engine, [own[0]] * len(reqs), reqs, args.new_tokens),
            "engine_own": engine_run(own_engine, own, reqs, args.new_tokens),
            "hf_static_batch": hf_static_batch(AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval(),
                                               tokenizer, reqs, args.new_tokens),
        }
        samples: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.repeats):  # interleaved, so load changes hit every system alike
            for name, run in runs.items():
                samples[name].append(timed(run, 1, tokens)["seconds_median"])
        for name, times in samples.items():
            times.sort()
            med = times[len(times) // 2]
            results[name] = {"requests": args.requests, "seconds_median": med, "seconds_all": times,
                             "tokens_per_s": tokens / med}
        for name, eng in (("engine_shared", shared_engine), ("engine_own", own_engine)):
            st = eng.stats()
            results[name].update(steps=st.steps, preemptions=st.preemptions,
                                 prefix_misses=st.prefix_misses, prefix_hits=st.prefix_hits)
        results["hf_peft_serial"] = bench_hf_peft_serial(path, dtype, adapters[0], reqs[:args.serial_requests],
                                                         args.new_tokens)

    own_tps = results["engine_own"]["tokens_per_s"]
    ratios = {
        "own_vs_shared_prefix": own_tps / results["engine_shared"]["tokens_per_s"],
        "own_vs_hf_static_batch": own_tps / results["hf_static_batch"]["tokens_per_s"],
        "own_vs_hf_peft_serial": own_tps / results["hf_peft_serial"]["tokens_per_s"],
    }
    targets = {"own_vs_shared_prefix": 0.9, "own_vs_hf_static_batch": 1.0, "own_vs_hf_peft_serial": 10.0}
    report = {
        "workload": {"model": "SmolLM2-135M-Instruct", "dtype": str(dtype).removeprefix("torch."),
                     "requests": args.requests, "prompt_tokens": [min(map(len, reqs)), max(map(len, reqs))],
                     "new_tokens": args.new_tokens, "prefix_len": args.prefix_len, "greedy": True,
                     "eos_ignored": True, "serial_subset": args.serial_requests, "repeats": args.repeats,
                     "max_num_batched_tokens": args.max_num_batched_tokens},
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "cuda": torch.cuda.is_available()},
        "results": results,
        "ratios": ratios,
        "targets_met": {k: ratios[k] >= v for k, v in targets.items()},
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print("| system | tokens/s |\n|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['tokens_per_s']:.1f} |")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x (target {targets[k]}x)")


if __name__ == "__main__":
    main()
