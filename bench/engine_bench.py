"""Engine speed against HF transformers + PEFT, in one process, on one workload.

    .venv/bin/python bench/engine_bench.py            # SmolLM2, bfloat16, 64 requests
    .venv/bin/python bench/engine_bench.py --quick    # 16 requests, 16 new tokens (smoke)

Workload: SmolLM2-135M-Instruct, 64 requests with ~32-token prompts (E2E meaning
representations), 64 new tokens each (greedy, EOS ignored), prefix length 16.
Systems (medians of --repeats interleaved runs):
  hf_peft_serial   HF + PEFT, one request at a time (what users do today). Run on a subset
                   (--serial-requests) because it is slow; tokens/s is a rate, so it compares.
  hf_static_batch  HF generate, all requests as one left-padded batch, no prefix.
  engine_shared    prefix-serve, every request on the same prefix.
  engine_own       prefix-serve, every request on its own prefix.
  engine_own_half_logprobs / engine_own_all_logprobs
                   the same with every 2nd / every request asking for logprobs (top 5): what
                   logprobs cost, and that requests that do not ask pay nothing for them
Also, in the same run:
  peak             a 2048x2048 bfloat16 matmul (the machine's matmul peak), and the decode shapes
  mfu              model FLOPs/s (the matmuls: 2 x params x tokens) over the peak, for the
                   workload above and at saturation (--saturation requests at once)
  prefill          one 512-token prompt through the engine against one HF forward over it
  drift            greedy tokens of the engine and of HF, both in bfloat16, each compared with
                   float32 HF: bf16 drift from float32 is rounding when both drift alike
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


def engine_run(engine, prefixes, reqs: list[list[int]], new_tokens: int, logprobs_every: int = 0):
    """A closed batch of every request; with logprobs_every=k, every k-th request asks for
    its sampled token's logprob and the top 5 (OpenAI's logprobs=5)."""
    from server.engine.sampling_params import SamplingParams

    plain = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    scored = SamplingParams(max_tokens=new_tokens, ignore_eos=True, logprobs=5)
    params = [scored if logprobs_every and i % logprobs_every == 0 else plain for i in range(len(reqs))]
    engine.generate(reqs[:4], SamplingParams(max_tokens=2, ignore_eos=True), prefixes[:4])  # warm-up

    def run() -> None:
        done = engine.generate(reqs, params, prefixes)
        assert all(len(r.output_token_ids) == new_tokens for r in done)
        assert all(len(r.logprobs) == new_tokens for r, p in zip(done, params) if p is scored)
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


def cpu_model() -> str:
    """The CPU's model name and its bf16 matmul features (AMX or AVX512-BF16): the peak and every
    ratio here depend on them, and machines of one name differ."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    bf16 = ', '.join(f for f in ('amx_bf16', 'avx512_bf16') if f in flags) or 'no bf16 matmul units'
    vector = next((f for f in ('avx512f', 'avx2') if f in flags), 'no avx2')
    return f"{name} ({bf16}; {vector})"


def matmul_peak(dtype: torch.dtype) -> dict:
    """GFLOP/s of a 2048^2 matmul (the peak) and of the engine's decode shapes at batch 64."""
    def rate(m: int, k: int, n: int, repeats: int) -> float:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        for _ in range(3):
            a @ b
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        return 2 * m * k * n * repeats / (time.perf_counter() - t0) / 1e9

    return {"matmul_2048_gflops": max(rate(2048, 2048, 2048, 10) for _ in range(3)),
            "decode_shapes_gflops": {f"{m}x{k}x{n}": rate(m, k, n, 200)
                                     for m, k, n in ((64, 576, 960), (64, 576, 3072), (64, 1536, 576))}}


def matmul_flops_per_token(model) -> float:
    """2 x the weights of every matmul a token passes through (the layers' linears and lm_head)."""
    return 2.0 * sum(m.weight.numel() for name, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear))


def bench_prefill(path, dtype, prefix, engine, length: int = 512, repeats: int = 3) -> dict:
    """One prompt of `length` tokens: the engine's prefill (max_tokens=1) against one HF forward."""
    from transformers import AutoModelForCausalLM

    from server.engine.sampling_params import SamplingParams

    ids = [100 + (i * 37) % 20000 for i in range(length)]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    x = torch.tensor([ids])
    with torch.inference_mode():
        hf(x)
    engine.generate([ids], SamplingParams(max_tokens=1), [prefix])
    hf_times, engine_times = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.inference_mode():
            hf(x)
        hf_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        engine.generate([ids], SamplingParams(max_tokens=1), [prefix])
        engine_times.append(time.perf_counter() - t0)
    hf_s, engine_s = sorted(hf_times)[repeats // 2], sorted(engine_times)[repeats // 2]
    return {"tokens": length, "hf_forward_tokens_per_s": length / hf_s, "engine_tokens_per_s": length / engine_s,
            "engine_time_vs_hf": engine_s / hf_s}


def bench_drift(path, tokenizer, reqs: list[list[int]], new_tokens: int, engine_bf16) -> dict:
    """Greedy tokens without a prefix, engine bf16 and HF bf16, each against HF float32.

    Where two bf16 runs part from float32 tells little by itself (after the first different
    token the texts differ). So each bf16 continuation is also scored by float32, teacher
    forced: at every step where the bf16 run picked a token other than float32's argmax, the
    float32 logit gap between the two. Rounding only flips near ties (gaps of a few tenths
    of a logit, the size of bf16's logit error); a bug picks tokens float32 rates far lower.
    """
    from transformers import AutoModelForCausalLM

    from server.engine.sampling_params import SamplingParams

    def hf_greedy(model):
        out = []
        with torch.inference_mode():
            for ids in reqs:
                x = torch.tensor([ids])
                g = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
                out.append(g[0, len(ids):].tolist())
        return out

    def agree(a: list[int], b: list[int]) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    fp32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def gaps(continuations: list[list[int]]) -> dict:
        """float32's verdict on bf16's choices, teacher forced on the bf16 continuation."""
        found: list[float] = []
        positions = 0
        with torch.inference_mode():
            for ids, cont in zip(reqs, continuations):
                logits = fp32(torch.tensor([ids + cont])).logits[0, len(ids) - 1:-1].float()
                chosen = logits.gather(1, torch.tensor(cont)[:, None])[:, 0]
                gap = logits.max(1).values - chosen
                found += gap[gap > 0].tolist()
                positions += len(cont)
        return {"positions": positions, "not_fp32_argmax": len(found),
                "fp32_logit_gap_max": max(found, default=0.0),
                "fp32_logit_gap_mean": sum(found) / len(found) if found else 0.0}

    ref = hf_greedy(fp32)
    hf16 = hf_greedy(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval())
    eng16 = [r.output_token_ids for r in engine_bf16.generate(reqs, SamplingParams(max_tokens=new_tokens,
                                                                                   ignore_eos=True))]
    return {"prompts": len(reqs), "new_tokens": new_tokens,
            "engine_bf16_equals_hf_bf16": sum(a == b for a, b in zip(eng16, hf16)),
            "hf_bf16_equals_fp32": sum(a == b for a, b in zip(hf16, ref)),
            "engine_bf16_equals_fp32": sum(a == b for a, b in zip(eng16, ref)),
            "mean_tokens_agreeing_with_fp32": {
                "hf_bf16": sum(agree(a, b) for a, b in zip(hf16, ref)) / len(reqs),
                "engine_bf16": sum(agree(a, b) for a, b in zip(eng16, ref)) / len(reqs)},
            "teacher_forced_fp32": {"hf_bf16": gaps(hf16), "engine_bf16": gaps(eng16)}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefix-len", type=int, default=16)
    ap.add_argument("--serial-requests", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--saturation", type=int, default=256, help="requests at once for the saturation MFU")
    ap.add_argument("--drift-prompts", type=int, default=16)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "engine_bench.json"))
    args = ap.parse_args()
    if args.quick:
        args.requests, args.new_tokens, args.serial_requests, args.repeats = 16, 16, 2, 1
        args.saturation, args.drift_prompts = 32, 4

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
            "engine_own_half_logprobs": engine_run(own_engine, own, reqs, args.new_tokens, logprobs_every=2),
            "engine_own_all_logprobs": engine_run(own_engine, own, reqs, args.new_tokens, logprobs_every=1),
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

        # peak and model FLOP utilisation, in this run
        peak = matmul_peak(dtype)
        per_token = matmul_flops_per_token(model)
        sat_engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=args.saturation,
                                                              max_num_batched_tokens=2048, kv_cache_bytes=1 << 30))
        sat_reqs = prompts(tokenizer, args.saturation)
        sat_prefixes = [sat_engine.make_prefix(own[i % len(own)].kv) for i in range(args.saturation)]
        sat = timed(engine_run(sat_engine, sat_prefixes, sat_reqs, args.new_tokens), 1,
                    args.saturation * args.new_tokens)

        def mfu(prompt_tokens: int, new_tokens: int, seconds: float) -> dict:
            gflops = per_token * (prompt_tokens + new_tokens) / seconds / 1e9
            return {"model_gflops": gflops, "of_peak": gflops / peak["matmul_2048_gflops"]}

        workload_prompt = sum(map(len, reqs)) + args.prefix_len * 0  # the prefix is not computed
        results["mfu"] = {
            "flops_per_token": per_token, "peak": peak,
            "workload": mfu(workload_prompt, tokens, results["engine_own"]["seconds_median"]),
            "saturation": {"requests": args.saturation, "tokens_per_s": sat["tokens_per_s"],
                           **mfu(sum(map(len, sat_reqs)), args.saturation * args.new_tokens, sat["seconds_median"])},
        }
        del sat_engine
        results["prefill_512"] = bench_prefill(path, dtype, own[0], own_engine)
        results["drift"] = bench_drift(path, tokenizer, reqs[:args.drift_prompts], args.new_tokens, shared_engine)

    own_tps = results["engine_own"]["tokens_per_s"]
    ratios = {
        "own_vs_shared_prefix": own_tps / results["engine_shared"]["tokens_per_s"],
        "own_vs_hf_static_batch": own_tps / results["hf_static_batch"]["tokens_per_s"],
        "own_vs_hf_peft_serial": own_tps / results["hf_peft_serial"]["tokens_per_s"],
        # what logprobs cost: half or all of the same requests asking for logprobs=5
        "half_logprobs_vs_none": results["engine_own_half_logprobs"]["tokens_per_s"] / own_tps,
        "all_logprobs_vs_none": results["engine_own_all_logprobs"]["tokens_per_s"] / own_tps,
    }
    ratios["saturation_mfu"] = results["mfu"]["saturation"]["of_peak"]
    ratios["prefill_512_engine_time_vs_hf"] = results["prefill_512"]["engine_time_vs_hf"]
    targets = {"own_vs_shared_prefix": 0.95, "own_vs_hf_static_batch": 2.0, "own_vs_hf_peft_serial": 10.0,
               "saturation_mfu": 0.5}
    report = {
        "workload": {"model": "SmolLM2-135M-Instruct", "dtype": str(dtype).removeprefix("torch."),
                     "requests": args.requests, "prompt_tokens": [min(map(len, reqs)), max(map(len, reqs))],
                     "new_tokens": args.new_tokens, "prefix_len": args.prefix_len, "greedy": True,
                     "eos_ignored": True, "serial_subset": args.serial_requests, "repeats": args.repeats,
                     "max_num_batched_tokens": args.max_num_batched_tokens},
        "machine": {"cpu": platform.processor() or platform.machine(), "cpu_model": cpu_model(),
                    "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "cuda": torch.cuda.is_available()},
        "results": results,
        "ratios": ratios,
        "targets_met": {**{k: ratios[k] >= v for k, v in targets.items()},
                        "prefill_512_engine_time_vs_hf": ratios["prefill_512_engine_time_vs_hf"] <= 1.2},
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print("| system | tokens/s |\n|---|---|")
    for name in ("hf_peft_serial", "hf_static_batch", "engine_shared", "engine_own"):
        print(f"| {name} | {results[name]['tokens_per_s']:.1f} |")
    m = results["mfu"]
    print(f"peak {m['peak']['matmul_2048_gflops']:.0f} GFLOP/s; MFU workload {m['workload']['of_peak']:.1%}, "
          f"saturation ({m['saturation']['requests']} requests, {m['saturation']['tokens_per_s']:.0f} tok/s) "
          f"{m['saturation']['of_peak']:.1%}")
    pf = results["prefill_512"]
    print(f"prefill 512: engine {pf['engine_tokens_per_s']:.0f} tok/s, HF forward {pf['hf_forward_tokens_per_s']:.0f} "
          f"tok/s (engine time {pf['engine_time_vs_hf']:.2f}x HF's, target <= 1.2x)")
    print(f"drift: {results['drift']}")
    for k, v in ratios.items():
        if k in targets:
            print(f"{k}: {v:.2f} (target {targets[k]})")


if __name__ == "__main__":
    main()
