"""What structured output costs the engine: the same closed batch with no request guided,
every 2nd request guided, and every request guided (response_format json_object).

    .venv/bin/python bench/guided_bench.py

Workload: SmolLM2-135M-Instruct, bfloat16, 64 requests with ~32-token prompts (engine_bench's),
64 new tokens each, greedy, EOS ignored (a guided request that has closed its JSON may only
produce EOS, so every run produces the same number of tokens). Each request on its own
random prefix of 16. The automaton is compiled before timing (it is cached per schema).
Medians of --repeats interleaved runs. Writes bench/results/guided_bench.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_bench import cpu_model, prompts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "guided_bench.json"))
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.engine.config import EngineConfig
    from server.engine.guided_decoding import json_schema_regex
    from server.engine.llm_engine import LLMEngine
    from server.engine.model_loader import ensure_default_model
    from server.engine.sampling_params import SamplingParams

    torch.manual_seed(0)
    path = ensure_default_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=max(64, args.requests)))
    spec = engine.spec
    prefixes = [engine.make_prefix(torch.randn(spec.num_layers, 2, spec.num_kv_heads, 16, spec.head_dim) * 0.3)
                for _ in range(args.requests)]
    reqs = prompts(tokenizer, args.requests)
    regex = json_schema_regex(None)
    t0 = time.perf_counter()
    engine.guides.index(regex)
    compile_s = time.perf_counter() - t0
    free = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)
    guided = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True, guided_regex=regex)
    runs = {"none_guided": [free] * len(reqs),
            "half_guided": [guided if i % 2 == 0 else free for i in range(len(reqs))],
            "all_guided": [guided] * len(reqs)}
    engine.generate(reqs[:4], [guided, free, guided, free], prefixes[:4])  # warm-up
    samples: dict[str, list[float]] = {k: [] for k in runs}
    valid = {}
    for _ in range(args.repeats):
        for name, params in runs.items():
            t0 = time.perf_counter()
            done = engine.generate(reqs, params, prefixes)
            samples[name].append(time.perf_counter() - t0)
            assert all(len(r.output_token_ids) == args.new_tokens for r in done)
            valid[name] = sum(_is_json_object(r.output_text) for r, p in zip(done, params) if p is guided)
    tokens = args.requests * args.new_tokens
    results = {}
    for name, times in samples.items():
        times.sort()
        med = times[len(times) // 2]
        results[name] = {"seconds_median": med, "seconds_all": times, "tokens_per_s": tokens / med}
        if name != "none_guided":
            results[name]["guided_outputs_that_are_complete_json"] = valid[name]
    base = results["none_guided"]["tokens_per_s"]
    for name in ("half_guided", "all_guided"):
        results[name]["vs_none_guided"] = results[name]["tokens_per_s"] / base
    out = {"workload": {"model": "SmolLM2-135M-Instruct", "dtype": "bfloat16", "requests": args.requests,
                        "new_tokens": args.new_tokens, "prefix_len": 16, "response_format": "json_object",
                        "eos_ignored": True, "repeats": args.repeats},
           "machine": {"threads": torch.get_num_threads(), "torch": torch.__version__, "cpu_model": cpu_model()},
           "compile_seconds_json_object": compile_s, "results": results}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


if __name__ == "__main__":
    main()
