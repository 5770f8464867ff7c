"""Training speed per example: the trainer as it was against the trainer as it is, same run.

    .venv/bin/python bench/train_speed.py                 # ~5 minutes on 2 cores
    .venv/bin/python bench/train_speed.py --steps 4 --repeats 1   # smoke run

Both train a 10-token prefix of SmolLM2-135M-Instruct on the same E2E examples (dev set,
shuffled with a fixed seed), batch 5 by default, and time whole optimizer steps (MLP
forward, model forward and backward, clipping, AdamW):

  before       the previous trainer step: float32 model, right-padded rows, logits (and
               the log-softmax) at every position, examples in a random order
  packed       float32, sequences packed (no padding, shared beginnings once), logits only
               where a loss is
  packed_bf16  the same with a bfloat16 copy of the frozen model (MLP, AdamW and losses
               stay float32): mixed precision on AMX
  grouped      packed_bf16 with batches that take the references of one E2E table
               together (TrainConfig.group_prompts), so each table prompt runs once

Timings are interleaved (before, packed, ..., before, ...) and each system's median over
--repeats rounds is reported, as examples per second and as a speed-up over `before` in
the same run. On a shared machine the absolute numbers move a lot; the ratios less.
Writes bench/results/train_speed.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from server.engine.model_loader import load_model
from server.prefix import ModelSpec
from server.training.data import read_examples, tokenize
from server.training.prefix_forward import forward_with_prefix, prefix_past
from server.training.trainer import TrainConfig, build_prefix_mlp, collate, completion_loss, train_prefix

ROOT = Path(__file__).resolve().parents[1]
E2E = ROOT.parent / "shared" / "data" / "e2e" / "devset.csv"


def before_steps(model, data, config: TrainConfig, steps: int, seed: int) -> tuple[float, int]:
    """The trainer's step as it was (fcf73d7): (seconds, examples) for `steps` steps."""
    rng = random.Random(seed)
    init_kv = prefix_past(model, None, list(data[0].prompt_ids)[:config.num_virtual_tokens])
    mlp = build_prefix_mlp(model, config, init_kv)
    optimizer = torch.optim.AdamW(mlp.parameters(), lr=config.learning_rate)
    started = time.perf_counter()
    for _ in range(steps):
        batch = rng.sample(data, config.batch_size)
        ids, mask, labels = collate(batch, torch.device("cpu"))
        loss = completion_loss(forward_with_prefix(model, mlp(), ids, mask), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(mlp.parameters(), 1.0)
        optimizer.step()
    return time.perf_counter() - started, steps * config.batch_size


def trainer_steps(model, data, config: TrainConfig, steps: int) -> tuple[float, int, int]:
    """train_prefix as it is: (seconds, examples, packed tokens) for `steps` steps."""
    result = train_prefix(model, data, TrainConfig(**{**config.__dict__, "steps": steps}))
    return result.seconds, result.examples_seen, result.tokens_computed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(E2E))
    ap.add_argument("--examples", type=int, default=1000, help="E2E examples to draw batches from")
    ap.add_argument("--batch-size", type=int, default=5)
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per timed run")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median is reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_speed.json"))
    ap.add_argument("--note", default="", help="a line about the machine, recorded with the results")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default torch's); 1 on a loaded machine, where 2 threads wait on each other")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(None, dtype="float32", device="cpu")
    model32, tok = loaded.model, loaded.tokenizer
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    examples = read_examples(args.data)
    random.Random(args.seed).shuffle(examples)
    data = tokenize(tok, examples[:args.examples], 256)
    base = TrainConfig(num_virtual_tokens=10, batch_size=args.batch_size, learning_rate=1e-3, seed=args.seed,
                       init_text=None)
    systems = {
        "before": lambda s: before_steps(model32, data, base, args.steps, args.seed + s),
        "packed": lambda s: trainer_steps(model32, data, TrainConfig(**{**base.__dict__, "seed": s}), args.steps),
        "packed_bf16": lambda s: trainer_steps(model16, data, TrainConfig(**{**base.__dict__, "seed": s}), args.steps),
        "grouped": lambda s: trainer_steps(model16, data, TrainConfig(**{**base.__dict__, "seed": s,
                                                                        "group_prompts": True}), args.steps),
    }
    for name, run in systems.items():  # warm-up: first-call costs (oneDNN kernels, allocator)
        run(0) if name != "before" else before_steps(model32, data, base, 1, 0)
    runs: dict[str, list[dict]] = {name: [] for name in systems}
    for r in range(args.repeats):
        for name, run in systems.items():
            out = run(r + 1)
            seconds, seen = out[0], out[1]
            entry = {"seconds": round(seconds, 3), "examples": seen, "examples_per_s": round(seen / seconds, 3)}
            if len(out) > 2:
                entry["tokens_computed"] = out[2]
            runs[name].append(entry)
            print(f"round {r + 1} {name:>12}: {seen / seconds:6.2f} examples/s", flush=True)
    median = {name: statistics.median(e["examples_per_s"] for e in rs) for name, rs in runs.items()}
    summary = {
        "model": loaded.name, "batch_size": args.batch_size, "steps_per_run": args.steps, "repeats": args.repeats,
        "examples_per_s": {k: round(v, 3) for k, v in median.items()},
        "speedup_over_before": {k: round(v / median["before"], 2) for k, v in median.items()},
        "runs": runs,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "note": args.note},
    }
    print(json.dumps({k: summary[k] for k in ("examples_per_s", "speedup_over_before")}, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
