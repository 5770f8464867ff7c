"""`prefix-serve eval`: BLEU of a prefix (served by the engine, greedy) on a table-to-text file.

    prefix-serve eval --prefix my-prefix/ --data devset.csv --limit 100

Inputs are grouped by prompt (E2E: by meaning representation) and each generation is
scored against all references of its input (multi-reference BLEU, sacrebleu).
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="E2E csv (mr,ref) or jsonl ({prompt, completion})")
    parser.add_argument("--prefix", action="append", default=[], metavar="DIR",
                        help="PEFT prefix adapter folder; repeat to compose (task, then user); none = base model")
    parser.add_argument("--model", default=None, help="local HF model folder (default: the embedded SmolLM2)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N distinct inputs")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable), e.g. a newline")
    parser.add_argument("--kv-cache-mb", type=int, default=512, help="the engine's KV pool size")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--outputs", default=None, help="write each input, generation and references to this jsonl")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def run(args: argparse.Namespace) -> int:
    from server.engine.config import EngineConfig
    from server.engine.llm_engine import LLMEngine
    from server.engine.model_loader import load_model
    from server.training.data import group_references, read_examples
    from server.training.evaluate import evaluate_bleu

    try:
        groups = group_references(read_examples(args.data))
    except (ValueError, FileNotFoundError) as e:
        print(f"prefix-serve eval: {e}", file=sys.stderr)
        return 2
    if args.limit is not None:
        groups = groups[: args.limit]
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    engine = LLMEngine(loaded.model, loaded.tokenizer, EngineConfig(kv_cache_bytes=args.kv_cache_mb * 2**20))
    try:
        report = evaluate_bleu(loaded.model, loaded.tokenizer, groups, prefix_dirs=args.prefix,
                               max_tokens=args.max_tokens, stop=tuple(args.stop), engine=engine)
    except ValueError as e:
        print(f"prefix-serve eval: {e}", file=sys.stderr)
        return 2
    if args.outputs:
        with open(args.outputs, "w", encoding="utf-8") as f:
            for (prompt, refs), text in zip(groups, report.generations):
                f.write(json.dumps({"prompt": prompt, "generation": text, "references": refs}) + "\n")
    if args.json:
        print(json.dumps({"bleu": report.bleu.score, "inputs": report.bleu.num_hypotheses,
                          "max_references": report.bleu.max_references, "detail": report.bleu.detail,
                          "prefix": args.prefix, "seconds": round(report.seconds, 2)}))
    else:
        print(f"BLEU {report.bleu.score:.2f} on {report.bleu.num_hypotheses} inputs "
              f"(up to {report.bleu.max_references} references each), {report.seconds:.1f}s")
        print(report.bleu.detail)
    return 0
