"""Token logprobs in OpenAI's two shapes.

    completions: {"tokens": [str], "token_logprobs": [float | None],
                  "top_logprobs": [{str: float} | None], "text_offset": [int]}
    chat:        {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}

A token's text is the tokenizer's decoding of that token alone. In the completions shape
each position's top_logprobs also holds the token that was there (as vLLM reports it), so
"was it the most likely token" is `logprob == max(top_logprobs.values())`.
"""

from __future__ import annotations

from server.engine.outputs import TokenLogprob


class TokenTexts:
    """The text of single tokens, decoded once each."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id]) if self._tokenizer is not None else f"<{token_id}>"
            self._texts[token_id] = text
        return text


class CompletionLogprobs:
    """The completions shape, built up position by position (text_offset keeps counting
    across calls, so one instance serves one choice, streamed or not)."""

    def __init__(self, texts: TokenTexts, text_offset: int = 0) -> None:
        self.texts = texts
        self.offset = text_offset

    def block(self, token_ids: list[int], entries: list[TokenLogprob | None]) -> dict:
        tokens = [self.texts(t) for t in token_ids]
        offsets = []
        for text in tokens:
            offsets.append(self.offset)
            self.offset += len(text)
        top = [None if e is None else {**{self.texts(i): lp for i, lp in e.top}, self.texts(e.token_id): e.logprob}
               for e in entries]
        return {"tokens": tokens, "token_logprobs": [None if e is None else e.logprob for e in entries],
                "top_logprobs": top, "text_offset": offsets}


def merge_blocks(a: dict, b: dict) -> dict:
    return {key: a[key] + b[key] for key in a}


def chat_logprobs(texts: TokenTexts, entries: list[TokenLogprob], top: int) -> dict:
    def item(token_id: int, logprob: float) -> dict:
        text = texts(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(i, lp) for i, lp in e.top[:top]]}
                        for e in entries]}
