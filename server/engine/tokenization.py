"""Request text and chat messages -> token ids, the one way serving and training both use.

# NOTE: text that a client sends is text. A special token's spelling inside it (say
# `<|im_end|>` in a chat message) is tokenized as the characters it is made of, never as
# the control token, so a message cannot close its turn and open a system turn. Only the
# chat template's own markup becomes special tokens, and a raw prompt is parsed for
# special tokens only when the caller asks (`parse_special_tokens`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

CHAT_ROLES = ("system", "user", "assistant")

# Private-use characters: a template never writes them, so they mark where content goes.
_SLOT = "\ue000{}\ue001"
_SLOT_RE = re.compile("\ue000(\\d+)\ue001")


class TemplateError(ValueError):
    """The chat template cannot render these messages (or the model has none)."""


@dataclass(frozen=True)
class ChatMessage:
    role: str  # one of CHAT_ROLES
    content: str


def encode_text(tokenizer, text: str, parse_special_tokens: bool = False, add_special_tokens: bool = True) -> list[int]:
    """A prompt's token ids, with the tokenizer's own BOS/EOS handling (as training saw it)."""
    return list(tokenizer(text, add_special_tokens=add_special_tokens,
                          split_special_tokens=not parse_special_tokens)["input_ids"])


def render_chat(tokenizer, messages: Sequence[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` through the tokenizer's chat template, content taken as text."""
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("this model's tokenizer has no chat template: send a prompt instead of messages")
    for m in messages:
        if m.role not in CHAT_ROLES:
            raise TemplateError(f"role {m.role[:32]!r} is not one of {', '.join(CHAT_ROLES)}")
    specials = _special_texts(tokenizer)
    if not any(s in m.content for m in messages for s in specials):
        # Nothing to escape: tokenize the rendered text in one piece, exactly as
        # apply_chat_template(tokenize=True) does (the template's merges included).
        text = _render(tokenizer, [(m.role, m.content) for m in messages], add_generation_prompt)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    # Render with a marker in place of each content, then tokenize the template's pieces
    # with special tokens and each content with special tokens split into plain text.
    text = _render(tokenizer, [(m.role, _SLOT.format(i)) for i, m in enumerate(messages)], add_generation_prompt)
    ids: list[int] = []
    pieces = _SLOT_RE.split(text)  # template, index, template, index, ..., template
    for n, piece in enumerate(pieces):
        if n % 2:
            content = messages[int(piece)].content
            ids += tokenizer(content, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        elif piece:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids


def _render(tokenizer, messages: list[tuple[str, str]], add_generation_prompt: bool) -> str:
    chat = [{"role": role, "content": content} for role, content in messages]
    try:
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # a template may raise anything (jinja errors, its own checks)
        raise TemplateError(f"the chat template could not render these messages: {e}") from e


def _special_texts(tokenizer) -> tuple[str, ...]:
    """The spellings of the tokenizer's special tokens (added tokens marked special)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    texts = {t.content for t in decoder.values() if getattr(t, "special", False) and t.content}
    texts.update(t for t in getattr(tokenizer, "all_special_tokens", []) if t)
    return tuple(sorted(texts))
