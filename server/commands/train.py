"""`prefix-serve train`: train a prefix offline from a jsonl or csv file, write a PEFT adapter.

    prefix-serve train --data train.jsonl --out my-prefix/ --steps 200 --num-virtual-tokens 10

The folder holds adapter_config.json + adapter_model.safetensors (HF PEFT PREFIX_TUNING,
loadable by PeftModel.from_pretrained and uploadable to a server) and training.json (the
settings and the losses).

With a seq2seq model folder (BART, T5) it trains the three-prefix form instead (decoder,
encoder and cross-attention parts, server/training/seq2seq_trainer.py):

    prefix-serve train --model my_bart/ --data train.jsonl --out my-prefix/ --encoder-tokens 10 \
        --cross-tokens 10 --export-peft my-prefix-peft/

--out then holds prefix.safetensors (our three-prefix file, docs/peft-prefix-format.md) and
training.json; --export-peft writes what PEFT can represent, the decoder part, as a
SEQ_2_SEQ_LM adapter folder.
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
    parser.add_argument("--encoder-tokens", type=int, default=None,
                        help="seq2seq only: length of the encoder part (default: --num-virtual-tokens; 0 = none)")
    parser.add_argument("--cross-tokens", type=int, default=None,
                        help="seq2seq only: length of the cross-attention part (default: --num-virtual-tokens; 0 = none)")
    parser.add_argument("--export-peft", default=None, metavar="DIR",
                        help="seq2seq only: also write the decoder part as a PEFT SEQ_2_SEQ_LM adapter folder")


SEQ2SEQ_FILE = "prefix.safetensors"  # the three-prefix form, as prefix_store.codec writes it


def _with_progress(steps: int, train):
    """train(progress) under a progress bar on stderr; None when interrupted (Ctrl-C: nothing
    is written)."""
    from tqdm import tqdm

    bar = tqdm(total=steps, unit="step", file=sys.stderr, dynamic_ncols=True)

    def progress(step: int, total: int, loss: float) -> bool:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        return True

    try:
        return train(progress)
    except KeyboardInterrupt:
        print("\nprefix-serve train: interrupted; nothing written", file=sys.stderr)
        return None
    finally:
        bar.close()


def run(args: argparse.Namespace) -> int:
    import torch

    if args.model is not None and _is_seq2seq(args.model):
        return run_seq2seq(args)
    if args.encoder_tokens is not None or args.cross_tokens is not None or args.export_peft is not None:
        print("prefix-serve train: --encoder-tokens, --cross-tokens and --export-peft are for seq2seq models "
              "(BART, T5); this model's adapter in --out is already a PEFT folder", file=sys.stderr)
        return 2

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

    result = _with_progress(config.steps, lambda progress: train_prefix(
        loaded.model, data, config, tokenizer=loaded.tokenizer, task_kv=task_kv, progress=progress))
    if result is None:
        return 130
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


def _is_seq2seq(folder: str) -> bool:
    from server.engine.model_loader import model_kind
    from server.prefix import ModelKind

    try:
        return model_kind(folder) is ModelKind.SEQ2SEQ_LM
    except (OSError, ValueError):
        return False  # not a readable HF folder: the causal path says so


def run_seq2seq(args: argparse.Namespace) -> int:
    """Train a three-prefix on a BART or T5 folder; see the module's docstring."""
    from transformers import AutoModelForSeq2SeqLM

    from prefix_store import codec
    from server.engine.model_loader import load_tokenizer, resolve_device, resolve_dtype
    from server.engine.seq2seq import PrefixSeq2Seq, Seq2SeqError
    from server.prefix.peft_format import write_adapter
    from server.training.data import read_examples
    from server.training.seq2seq_trainer import Seq2SeqTrainConfig, tokenize_seq2seq, train_three_prefix

    p = args.num_virtual_tokens
    try:
        config = Seq2SeqTrainConfig(num_virtual_tokens=p, encoder_tokens=p if args.encoder_tokens is None
                                    else args.encoder_tokens, cross_tokens=p if args.cross_tokens is None
                                    else args.cross_tokens, steps=args.steps, learning_rate=args.lr,
                                    batch_size=args.batch_size, mid_dim=args.mid_dim, init_text=args.init_text,
                                    seed=args.seed)
        examples = read_examples(args.data)
    except (ValueError, FileNotFoundError) as e:
        print(f"prefix-serve train: {e}", file=sys.stderr)
        return 2
    if args.limit is not None:
        examples = examples[: args.limit]
    device = resolve_device(args.device)
    model = AutoModelForSeq2SeqLM.from_pretrained(args.model, dtype=resolve_dtype(args.dtype, device)).to(device)
    tokenizer = load_tokenizer(args.model)
    try:
        engine = PrefixSeq2Seq(model)
        [eos, *_] = sorted(engine.eos_token_ids)
        data = tokenize_seq2seq(tokenizer, examples, eos)
    except (ValueError, Seq2SeqError) as e:
        print(f"prefix-serve train: {e}", file=sys.stderr)
        return 2
    print(f"training decoder {config.num_virtual_tokens}, encoder {config.encoder_tokens} and cross "
          f"{config.cross_tokens} virtual tokens on {len(data)} examples from {args.data} ({args.model}, "
          f"{engine.spec.num_layers} layers)", file=sys.stderr)
    result = _with_progress(config.steps, lambda progress: train_three_prefix(
        engine, data, config, tokenizer=tokenizer, progress=progress))
    if result is None:
        return 130
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_bytes, version = codec.encode(result.kv, encoder_kv=result.encoder_kv, cross_kv=result.cross_kv)
    (out / SEQ2SEQ_FILE).write_bytes(data_bytes)
    if args.export_peft is not None:
        write_adapter(result.kv, args.export_peft, engine.spec, mid_dim=config.mid_dim,
                      base_model_name_or_path=str(args.model))
    summary = {
        "data": str(args.data), "examples": len(data), "model": str(args.model), "config": asdict(config),
        "version": version, "steps_done": len(result.losses), "seconds": round(result.seconds, 2),
        "first_loss": result.losses[0], "final_loss": result.losses[-1], "losses": result.losses,
        "peft_export": args.export_peft,
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f} in {result.seconds:.1f}s; wrote {out}"
          + (f" and {args.export_peft}" if args.export_peft else ""), file=sys.stderr)
    return 0
