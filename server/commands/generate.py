"""`prefix-serve generate`: one-off generation with the engine, no server, no Redis."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--prefix", action="append", default=[],
                   help="a PEFT adapter folder or .safetensors prefix; repeat to compose in order")
    p.add_argument("--model", default=None, help="local HF causal-LM folder (default: embedded SmolLM2)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to the prompt")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[])


def run(args: argparse.Namespace) -> int:
    from server.engine.llm_engine import LLMEngine
    from server.engine.model_loader import load_model
    from server.engine.sampling_params import SamplingParams
    from server.engine.tokenization import ChatMessage, encode_text, render_chat
    from server.prefix import PrefixError, compose
    from server.prefix.peft_format import read_prefix_path

    loaded = load_model(args.model, args.dtype, args.device)
    engine = LLMEngine(loaded.model, loaded.tokenizer)
    tok = loaded.tokenizer
    try:
        prefixes = [engine.make_prefix(read_prefix_path(path, engine.spec)) for path in args.prefix]
        sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                  top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
        # tokenized exactly as the server tokenizes a request
        ids = render_chat(tok, [ChatMessage("user", args.prompt)]) if args.chat else encode_text(tok, args.prompt)
        req = engine.generate([ids], sampling, [compose(prefixes) if prefixes else None])[0]
    except (PrefixError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(req.output_text)
    return 0
