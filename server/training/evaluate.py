"""Generate with the serving engine (greedy) for each input and score multi-reference BLEU.

The generations come from `LLMEngine.generate`, so the score is that of the prefix as it
is served, not of a training-time forward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.prefix.peft_format import read_adapter
from server.engine.sampling_params import SamplingParams
from server.training.bleu import BleuScore, multi_reference_bleu
from server.training.data import encode_prompt


@dataclass(frozen=True)
class EvalReport:
    bleu: BleuScore
    generations: list[str]  # one per input, in input order
    seconds: float  # generation time


def load_prefixes(engine: LLMEngine, prefix_dirs: list[str]) -> torch.Tensor | None:
    """PEFT adapter folders composed in order (task, then user) -> kv, or None for none."""
    if not prefix_dirs:
        return None
    return torch.cat([read_adapter(d, engine.spec) for d in prefix_dirs], dim=3)


def generate_texts(engine: LLMEngine, prompts: list[str], kv: torch.Tensor | None, max_tokens: int,
                   stop: tuple[str, ...] = ()) -> list[str]:
    """Greedy generations, one per prompt, all submitted at once (continuous batching)."""
    prefix = engine.make_prefix(kv) if kv is not None else None
    ids = [encode_prompt(engine.tokenizer, p) for p in prompts]
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=stop)
    finished = engine.generate(ids, sampling, [prefix] * len(ids))
    return [r.output_text.strip() for r in finished]


def evaluate_bleu(model: torch.nn.Module, tokenizer, groups: list[tuple[str, list[str]]],
                  prefix_dirs: list[str] | tuple[str, ...] = (), kv: torch.Tensor | None = None, max_tokens: int = 64,
                  stop: tuple[str, ...] = (), prompt_prefix: str = "",
                  engine: LLMEngine | None = None) -> EvalReport:
    """BLEU of greedy generations for (prompt, references) groups.

    `prompt_prefix` is text put before every prompt (few-shot examples); `kv` or
    `prefix_dirs` give the prefix (not both).
    """
    if not groups:
        raise ValueError("no inputs to evaluate")
    if prefix_dirs and kv is not None:
        raise ValueError("give prefix_dirs or kv, not both")
    engine = engine or LLMEngine(model, tokenizer, EngineConfig())
    if prefix_dirs:
        kv = load_prefixes(engine, list(prefix_dirs))
    started = time.monotonic()
    texts = generate_texts(engine, [prompt_prefix + p for p, _ in groups], kv, max_tokens, stop)
    seconds = time.monotonic() - started
    return EvalReport(bleu=multi_reference_bleu(texts, [refs for _, refs in groups]),
                      generations=texts, seconds=seconds)
