"""Incremental detokenization and stop strings.

Decoding only the new token can split a multi-byte character or drop a leading space,
so each update decodes a short window (tokens since the last emitted boundary) twice,
with and without the new tokens, and emits the difference once it is whole text.
"""

from __future__ import annotations

from server.engine.request import Request


class Detokenizer:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def update(self, req: Request) -> None:
        """Append the text of req's new output tokens to req.output_text."""
        if self.tokenizer is None:
            return
        ids = req.output_token_ids
        before = self._decode(ids[req.detok_prefix_offset:req.detok_read_offset])
        after = self._decode(ids[req.detok_prefix_offset:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            req.output_text += after[len(before):]
            req.detok_prefix_offset = req.detok_read_offset
            req.detok_read_offset = len(ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""


def find_stop(text: str, stop: tuple[str, ...], new_chars: int) -> int | None:
    """Index where the earliest stop string starts, looking only where new text could match."""
    if not stop:
        return None
    start = max(0, len(text) - new_chars - max(len(s) for s in stop) + 1)
    hits = [i for i in (text.find(s, start) for s in stop) if i >= 0]
    return min(hits) if hits else None


def emittable(text: str, stop: tuple[str, ...], finished: bool) -> int:
    """How much of text may be streamed now: hold back a tail that could start a stop string."""
    if finished or not stop:
        return len(text)
    return max(0, len(text) - (max(len(s) for s in stop) - 1))
