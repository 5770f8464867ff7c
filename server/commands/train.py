"""`prefix-serve train`: train a prefix offline from a jsonl or csv file, write a PEFT adapter.

    prefix-serve train --data train.jsonl --out my-prefix/ --steps 200 --num-virtual-tokens 10

The folder holds adapter_config.json + adapter_model.safetensors (HF PEFT PREFIX_TUNING,
loadable by PeftModel.from_pretrained and uploadable to a server) and training.json (the
settings and the losses).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from server.training.trainer import TrainConfig

    d = TrainConfig()
    parser.add_argument("--data", required=True, help="jsonl ({prompt, completion} per line) or E2E csv (mr,ref)")
    parser.add_argument("--out", required=True, help="folder to write the PEFT adapter into")
    parser.add_argument("--model", default=None, help="local HF model folder (default: the embedded SmolLM2)")
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--num-virtual-tokens", type=int, default=d.num_virtual_tokens)
    parser.add_argument("--lr", type=float, default=d.learning_rate, help="peak learning rate (AdamW, linear decay)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--mid-dim", type=int, default=d.mid_dim, help="hidden width of the MLP reparameterization")
    parser.add_argument("--init-text", default=None,
                        help="real words the prefix starts from, e.g. 'table-to-text:' (default: the first example)")
    parser.add_argument("--max-length", type=int, default=d.max_length, help="longest example in tokens")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    parser.add_argument("--task-prefix", action="append", default=[], metavar="DIR",
                        help="frozen PEFT prefix(es) composed before the trained one (repeatable, in order)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N examples")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16 or auto")
    parser.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from server.engine.model_loader import load_model
    from server.prefix import ModelSpec
    from server.prefix.peft_format import read_adapter, write_adapter
    from server.training.data import read_examples, tokenize
    from server.training.trainer import TrainConfig, train_prefix

    try:
        config = TrainConfig(num_virtual_tokens=args.num_virtual_tokens, steps=args.steps, learning_rate=args.lr,
                             batch_size=args.batch_size, mid_dim=args.mid_dim, init_text=args.init_text,
                             max_length=args.max_length, seed=args.seed, weight_decay=args.weight_decay,
                             warmup_steps=args.warmup_steps)
        examples = read_examples(args.data)
    except (ValueError, FileNotFoundError) as e:
        print(f"prefix-serve train: {e}", file=sys.stderr)
        return 2
    if args.limit is not None:
        examples = examples[: args.limit]
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    spec = ModelSpec.from_hf(loaded.model)
    try:
        data = tokenize(loaded.tokenizer, examples, config.max_length)
        task_kv = None
        if args.task_prefix:
            task_kv = torch.cat([read_adapter(p, spec) for p in args.task_prefix], dim=3)
    except ValueError as e:
        print(f"prefix-serve train: {e}", file=sys.stderr)
        return 2
    print(f"training {config.num_virtual_tokens} virtual tokens on {len(data)} examples from {args.data} "
          f"({loaded.name}, {spec.num_layers} layers, {spec.num_kv_heads} kv heads)", file=sys.stderr)

    bar = tqdm(total=config.steps, unit="step", file=sys.stderr, dynamic_ncols=True)

    def progress(step: int, total: int, loss: float) -> bool:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        return True

    try:
        result = train_prefix(loaded.model, data, config, tokenizer=loaded.tokenizer, task_kv=task_kv,
                              progress=progress)
    except KeyboardInterrupt:
        print("\nprefix-serve train: interrupted; nothing written", file=sys.stderr)
        return 130
    finally:
        bar.close()
    out = write_adapter(result.kv, args.out, spec, mid_dim=config.mid_dim, base_model_name_or_path=loaded.path)
    summary = {
        "data": str(args.data), "examples": len(data), "model": loaded.path,
        "task_prefix": list(args.task_prefix), "config": asdict(config),
        "steps_done": result.steps_done, "seconds": round(result.seconds, 2),
        "first_loss": result.losses[0], "final_loss": result.losses[-1],
        "prefix_bytes": result.kv.numel() * 4, "losses": result.losses,
    }
    (Path(out) / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f} in {result.seconds:.1f}s; "
          f"wrote {out}", file=sys.stderr)
    return 0
