"""Corpus BLEU (sacrebleu) of generated texts against several references each.

E2E has several human references per meaning representation; the task's BLEU is
multi-reference: each hypothesis is scored against all references of its input at once.
sacrebleu takes reference *streams*, so inputs with fewer references are padded with
None, which it skips.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BleuScore:
    score: float  # 0-100
    num_hypotheses: int
    max_references: int
    detail: str  # sacrebleu's one-line summary (precisions, brevity penalty)


def multi_reference_bleu(hypotheses: list[str], references: list[list[str]]) -> BleuScore:
    """BLEU of hypotheses[i] against all of references[i]."""
    from sacrebleu.metrics import BLEU

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    empty = [i for i, refs in enumerate(references) if not refs]
    if empty:
        raise ValueError(f"input {empty[0]} has no reference ({len(empty)} such inputs)")
    width = max(len(refs) for refs in references)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]
    result = BLEU().corpus_score([h.strip() for h in hypotheses], streams)
    return BleuScore(score=float(result.score), num_hypotheses=len(hypotheses),
                     max_references=width, detail=str(result))
