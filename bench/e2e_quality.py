"""E2E table-to-text quality: a task prefix for SmolLM2 trained on CPU, against prompting.

    .venv/bin/python bench/e2e_quality.py --time-budget 20   # training stops after 20 min
    .venv/bin/python bench/e2e_quality.py --quick            # smoke run: a few steps, 5 inputs

Data: ../shared/data/e2e/devset.csv (E2E dev set, mr -> several human refs). Its meaning
representations are shuffled with a fixed seed; --val-mrs of them are held out for
validation, the trainer sees only the others (no mr in both).
Systems, all greedy, scored by multi-reference BLEU (sacrebleu) on the held-out mrs:
  zero_shot   the base model on the table prompt alone (stops at a newline)
  three_shot  3 training examples (prompt + reference) before the table prompt
  prefix      the trained task prefix, served by prefix-serve's engine
Training stops at --steps or when the --time-budget (minutes of wall-clock training) is
spent (via the progress callback), whichever is first; the linear schedule is laid out
for --steps, so a run cut by the budget ends at a learning rate above 0. Writes
bench/results/e2e_quality.json and a markdown table in bench/results/e2e_quality.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import time
from pathlib import Path

import torch

from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.model_loader import load_model
from server.training.data import Example, group_references, read_examples, tokenize
from server.training.evaluate import evaluate_bleu
from server.prefix import ModelSpec
from server.prefix.peft_format import write_adapter
from server.training.trainer import TrainConfig, train_prefix

ROOT = Path(__file__).resolve().parents[1]
E2E = ROOT.parent / "shared" / "data" / "e2e" / "devset.csv"


def split_by_mr(examples: list[Example], val_mrs: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out whole meaning representations (their prompt), never single references."""
    prompts = list(dict.fromkeys(e.prompt for e in examples))
    random.Random(seed).shuffle(prompts)
    held = set(prompts[:val_mrs])
    return [e for e in examples if e.prompt not in held], [e for e in examples if e.prompt in held]


def few_shot_text(train: list[Example], shots: int, seed: int) -> str:
    rng = random.Random(seed + 1)
    return "".join(f"{e.prompt}{e.completion}\n\n" for e in rng.sample(train, shots))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(E2E))
    ap.add_argument("--val-mrs", type=int, default=50, help="meaning representations held out for validation")
    ap.add_argument("--time-budget", "--minutes", dest="minutes", type=float, default=20.0,
                    help="training time budget in minutes (wall clock)")
    ap.add_argument("--steps", type=int, default=0,
                    help="schedule length; 0 = fit it to the time budget from a 3-step timing probe")
    ap.add_argument("--batch-size", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--num-virtual-tokens", type=int, default=10)
    ap.add_argument("--init-text", default="table-to-text:")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", help="the model served for every system's generations")
    ap.add_argument("--train-dtype", default="bfloat16",
                    help="the frozen model's dtype while training (a copy; the prefix, MLP and AdamW stay float32)")
    ap.add_argument("--group-prompts", action=argparse.BooleanOptionalAction, default=True,
                    help="batches take the references of one table together (its prompt computed once)")
    ap.add_argument("--out", default=None, help="default: bench/results/e2e_quality.json (quick: a temp file); "
                                                "the markdown table goes beside it (.md)")
    ap.add_argument("--note", default="", help="a line about the machine, recorded with the results")
    ap.add_argument("--prefix-out", default=None, help="also keep the trained prefix as a PEFT folder")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 steps, 5 validation mrs")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.val_mrs, args.max_tokens = 3, 5, 24
    if args.out is None:  # a smoke run never overwrites the recorded result
        args.out = "/tmp/e2e_quality_quick.json" if args.quick else str(ROOT / "bench" / "results" / "e2e_quality.json")

    torch.manual_seed(args.seed)
    loaded = load_model(None, dtype=args.dtype, device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    train, val = split_by_mr(read_examples(args.data), args.val_mrs, args.seed)
    groups = group_references(val)
    engine = LLMEngine(model, tok, EngineConfig())
    results: dict[str, dict] = {}

    def score(name: str, **kw) -> None:
        report = evaluate_bleu(model, tok, groups, max_tokens=args.max_tokens, engine=engine, **kw)
        results[name] = {"bleu": round(report.bleu.score, 2), "detail": report.bleu.detail,
                         "generation_seconds": round(report.seconds, 1), "sample": report.generations[:3]}
        print(f"{name:>10}: BLEU {report.bleu.score:6.2f}  ({report.seconds:.0f}s)", flush=True)

    score("zero_shot", stop=("\n",))
    score("three_shot", stop=("\n",), prompt_prefix=few_shot_text(train, 3, args.seed))

    data = tokenize(tok, train, TrainConfig().max_length)
    train_model = model if getattr(torch, args.train_dtype) == model.dtype else \
        copy.deepcopy(model).to(getattr(torch, args.train_dtype))
    steps, step_seconds = args.steps, None
    if steps <= 0:  # lay the linear schedule out over the budget: time a few steps first
        probe = TrainConfig(num_virtual_tokens=args.num_virtual_tokens, steps=3, learning_rate=args.lr,
                            batch_size=args.batch_size, init_text=args.init_text, seed=args.seed + 1,
                            group_prompts=args.group_prompts)
        timing = train_prefix(train_model, data, probe, tokenizer=tok)
        step_seconds = timing.seconds / timing.steps_done
        steps = max(10, int(args.minutes * 60 * 0.95 / step_seconds))
        print(f"  timing probe: {step_seconds:.2f} s/step -> {steps} steps in {args.minutes:g} min", flush=True)
    config = TrainConfig(num_virtual_tokens=args.num_virtual_tokens, steps=steps, learning_rate=args.lr,
                         batch_size=args.batch_size, init_text=args.init_text, seed=args.seed,
                         warmup_steps=min(50, steps // 10), group_prompts=args.group_prompts)
    deadline = time.monotonic() + args.minutes * 60

    def progress(step: int, total: int, loss: float) -> bool:
        if step % 25 == 0 or step == total:
            print(f"  step {step}/{total} loss {loss:.4f}", flush=True)
        return time.monotonic() < deadline

    result = train_prefix(train_model, data, config, tokenizer=tok, progress=progress)
    if args.prefix_out:
        write_adapter(result.kv, args.prefix_out, ModelSpec.from_hf(model), mid_dim=config.mid_dim)
    score("prefix", kv=result.kv, stop=("\n",))
    results["prefix"].update({
        "train_seconds": round(result.seconds, 1), "steps": result.steps_done,
        "examples_seen": result.steps_done * config.batch_size, "train_examples": len(train),
        "first_loss": round(result.losses[0], 4), "final_loss": round(sum(result.losses[-20:]) / len(result.losses[-20:]), 4),
        "prefix_bytes_float32": result.kv.numel() * 4, "prefix_shape": list(result.kv.shape),
        "stopped_by_time_budget": result.cancelled, "probe_seconds_per_step": step_seconds,
    })
    summary = {
        "model": loaded.name, "data": args.data, "val_mrs": len(groups), "train_mrs": len({e.prompt for e in train}),
        "train_examples": len(train), "max_tokens": args.max_tokens, "time_budget_minutes": args.minutes,
        "serve_dtype": args.dtype, "train_dtype": args.train_dtype,
        "config": {k: getattr(config, k) for k in config.__dataclass_fields__}, "quick": args.quick,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "note": args.note},
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    table = markdown(summary)
    out.with_suffix(".md").write_text(table)
    print("\n" + table)
    print(f"wrote {out} and {out.with_suffix('.md')}")


def markdown(summary: dict) -> str:
    """The results as a short markdown page (bench/results/e2e_quality.md)."""
    r = summary["results"]
    p = r["prefix"]
    c = summary["config"]
    names = {"zero_shot": "base model, zero-shot", "three_shot": "base model, 3-shot prompt",
             "prefix": f"base model + trained task prefix ({c['num_virtual_tokens']} virtual tokens), served by the engine"}
    lines = [
        f"# E2E table-to-text: {summary['model']}",
        "",
        f"Validation: {summary['val_mrs']} held-out meaning representations of the E2E dev set (all their "
        f"references, multi-reference sacrebleu BLEU); training: the other {summary['train_mrs']} "
        f"({summary['train_examples']} examples). Greedy, at most {summary['max_tokens']} tokens, stop at a newline.",
        "",
        "| system | BLEU | generation time |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {names.get(k, k)} | {v['bleu']:.2f} | {v['generation_seconds']:.0f} s |" for k, v in r.items()]
    m = summary["machine"]
    lines += [
        "",
        f"Prefix training: {p['steps']} steps of batch {c['batch_size']} ({p['examples_seen']} examples, "
        f"{p['examples_seen'] / max(1, summary['train_examples']):.2f} epochs) in {p['train_seconds'] / 60:.1f} min"
        + (f", stopped by the {summary['time_budget_minutes']:g}-minute time budget" if p["stopped_by_time_budget"] else "")
        + (f" (schedule length from a 3-step timing probe at {p['probe_seconds_per_step']:.2f} s/step against the "
           f"{summary['time_budget_minutes']:g}-minute budget)" if p.get("probe_seconds_per_step") else "")
        + f"; AdamW lr {c['learning_rate']:g} (linear warmup {c['warmup_steps']} steps, linear decay over "
        f"{c['steps']} steps), MLP reparameterization (mid_dim {c['mid_dim']}) started at the words "
        f"{c['init_text']!r}. Loss {p['first_loss']:.3f} -> {p['final_loss']:.3f} (mean of the last 20 steps).",
        "",
        f"Prefix size: {p['prefix_bytes_float32']:,} bytes in float32, kv shape {p['prefix_shape']} "
        "([layers, 2, kv heads, virtual tokens, head dim]).",
        "",
        f"Machine: {m['cores']} CPU cores ({m['cpu']}), {m['torch_threads']} torch threads; the frozen model "
        f"trained in {summary.get('train_dtype', 'float32')} (prefix, MLP and optimizer in float32), every system "
        f"served in {summary.get('serve_dtype', 'float32')}"
        + (", batches grouped by table" if c.get("group_prompts") else "") + "."
        + (f" {m['note']}" if m.get("note") else ""),
        "",
        "Samples (first validation input):",
        "",
    ]
    lines += [f"- {names.get(k, k)}: {v['sample'][0]!r}" for k, v in r.items() if v.get("sample")]
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    main()
