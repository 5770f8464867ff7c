"""Incremental detokenization and stop strings.

Decoding only the new token can split a multi-byte character or drop a leading space. A
fast (Rust) tokenizer decodes incrementally with its own DecodeStream (~1 us a token);
any other tokenizer decodes a short window (tokens since the last emitted boundary) twice,
with and without the new tokens, and emits the difference once it is whole text. Either
way the text streamed adds up to decode(all output tokens).
"""

from __future__ import annotations

from server.engine.request import Request


class Detokenizer:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._backend = getattr(tokenizer, "backend_tokenizer", None)  # the Rust tokenizer, if fast
        self._stream_type = None
        if self._backend is not None:
            try:
                from tokenizers.decoders import DecodeStream
            except ImportError:  # an older tokenizers: the windowed decode below
                self._backend = None
            else:
                self._stream_type = DecodeStream

    def update(self, req: Request) -> None:
        """Append the text of req's new output tokens to req.output_text."""
        if self.tokenizer is None:
            return
        ids = req.output_token_ids
        if self._backend is not None:
            if req.detok_stream is None:
                req.detok_stream = self._stream_type(skip_special_tokens=True)
            for token in ids[req.detok_read_offset:]:
                piece = req.detok_stream.step(self._backend, token)
                if piece:
                    req.output_text += piece
            req.detok_read_offset = len(ids)
            return
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
