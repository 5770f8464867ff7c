"""Training examples: read from jsonl or csv files, and tokenized for the trainer.

An example is a prompt/completion pair or a chat (a list of messages).
- jsonl: one `{"prompt": ..., "completion": ...}` or `{"messages": [{"role", "content"}, ...]}`
  object per line.
- csv: the E2E table-to-text layout (`mr,ref` columns, several refs per mr); the prompt is
  built from the meaning representation by `table_prompt`, the completion is " " + ref.

Tokenization trains what will be served (server/engine/tokenization.py renders requests):
- as text: the prompt as serving encodes a text prompt (its special tokens included), then
  the completion without special tokens, then EOS, so a trained prefix learns to stop;
- as chat: the turns before an assistant turn through the chat template with the
  generation prompt (exactly as a `messages` request is rendered), then the assistant's
  content, then the token that ends the turn. Every assistant turn of a chat is trained.
  With `chat_too`, a prompt/completion pair is trained both as text and as one user turn
  plus one assistant turn (when the tokenizer has a chat template), so the prefix works
  through `prompt` and through `messages`.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from server.engine.tokenization import CHAT_ROLES, ChatMessage, encode_text, render_chat


@dataclass(frozen=True)
class Example:
    """A prompt/completion pair, or a chat (`messages`, with prompt and completion empty)."""

    prompt: str = ""
    completion: str = ""
    messages: tuple[ChatMessage, ...] = ()

    @property
    def is_chat(self) -> bool:
        return bool(self.messages)

    def to_dict(self) -> dict:
        if self.is_chat:
            return {"messages": [{"role": m.role, "content": m.content} for m in self.messages]}
        return {"prompt": self.prompt, "completion": self.completion}

    @classmethod
    def from_dict(cls, row: object) -> "Example":
        """Raises ValueError saying what is wrong with `row`."""
        if not isinstance(row, dict):
            raise ValueError('expected {"prompt": str, "completion": str} or {"messages": [...]}')
        if "messages" in row:
            return cls.chat(row["messages"])
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
            raise ValueError('expected {"prompt": str, "completion": str} or {"messages": [...]}')
        if not row["completion"]:
            raise ValueError("empty completion")
        return cls(row["prompt"], row["completion"])

    @classmethod
    def chat(cls, messages: object) -> "Example":
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {\"role\", \"content\"}")
        chat = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must be {{\"role\": one of {', '.join(CHAT_ROLES)}, "
                                 "\"content\": str}")
            chat.append(ChatMessage(m["role"], m["content"]))
        answers = [i for i, m in enumerate(chat) if m.role == "assistant"]
        if not answers or answers[0] == 0:
            raise ValueError("a chat example needs an assistant message after at least one other message "
                             "(the assistant turns are what is trained)")
        if any(not chat[i].content.strip() for i in answers):
            raise ValueError("an assistant message is empty")
        return cls(messages=tuple(chat))


@dataclass(frozen=True)
class TokenizedExample:
    prompt_ids: tuple[int, ...]  # input only: masked out of the loss
    completion_ids: tuple[int, ...]  # the targets, EOS (or the end of the assistant turn) last
    source: int = 0  # index of the Example it came from (an example's forms stay on one side of a split)
    chat: bool = False  # rendered through the chat template

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


_SLOT = re.compile(r"\s*([^\[\],]+)\[([^\]]*)\]\s*")


def parse_mr(mr: str) -> list[tuple[str, str]]:
    """'name[Alimentum], area[city centre]' -> [('name', 'Alimentum'), ('area', 'city centre')]."""
    slots = [(m.group(1).strip(), m.group(2).strip()) for m in _SLOT.finditer(mr)]
    if not slots:
        raise ValueError(f"meaning representation {mr!r} has no slot[value] pairs")
    return slots


def table_prompt(mr: str) -> str:
    """The table-to-text prompt for one E2E meaning representation."""
    table = " | ".join(f"{key}: {value}" for key, value in parse_mr(mr))
    return f"Describe this restaurant in one sentence.\nData: {table}\nSentence:"


def read_examples(path: str | Path) -> list[Example]:
    """Examples from a .jsonl or .csv file (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        examples = _read_jsonl(path)
    elif suffix == ".csv":
        examples = _read_csv(path)
    else:
        raise ValueError(f"{path}: unknown data format {suffix!r}; expected .jsonl or .csv")
    if not examples:
        raise ValueError(f"{path} has no examples")
    return examples


def _read_jsonl(path: Path) -> list[Example]:
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            examples.append(Example.from_dict(json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not JSON: {e.msg}") from e
        except ValueError as e:
            raise ValueError(f"{path}:{number}: {e}") from e
    return examples


def _read_csv(path: Path) -> list[Example]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        if "mr" not in fields or "ref" not in fields:
            raise ValueError(f"{path}: csv needs columns 'mr' and 'ref' (E2E layout), has {fields}")
        return [Example(table_prompt(row["mr"]), " " + row["ref"].strip())
                for row in reader if row["ref"].strip()]


def group_references(examples: list[Example]) -> list[tuple[str, list[str]]]:
    """(prompt, all its completions) in first-seen order: E2E has several refs per mr."""
    groups: dict[str, list[str]] = {}
    for example in examples:
        groups.setdefault(example.prompt, []).append(example.completion.strip())
    return list(groups.items())


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """A prompt's token ids, exactly as serving encodes a text prompt."""
    return encode_text(tokenizer, prompt)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def end_of_turn_id(tokenizer) -> int:
    """The token the chat template closes an assistant turn with (e.g. `<|im_end|>`), when it
    is a special token; else EOS. Generation stops there, so a chat completion ends with it."""
    marker = "\ue000"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}],
                                         tokenize=False)
    after = text.split(marker, 1)[1] if marker in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    return ids[0] if ids and ids[0] in specials else tokenizer.eos_token_id


def tokenize(tokenizer, examples: list[Example], max_length: int, chat_too: bool = False) -> list[TokenizedExample]:
    """Token ids of each example in each form it is trained in (see the module docstring).

    Raises naming the first example longer than max_length."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; a trained prefix could never stop")
    chat_template = has_chat_template(tokenizer)
    if any(e.is_chat for e in examples) and not chat_template:
        raise ValueError("chat examples (messages) need a model whose tokenizer has a chat template; "
                         "send prompt/completion pairs")
    turn_end = end_of_turn_id(tokenizer) if chat_template else eos
    out = []
    for index, example in enumerate(examples):
        pairs: list[tuple[list[int], list[int], bool]] = []
        if example.is_chat:
            for turn, message in enumerate(example.messages):
                if message.role == "assistant":
                    pairs.append((render_chat(tokenizer, example.messages[:turn]),
                                  _completion_ids(tokenizer, message.content.strip(), turn_end), True))
        else:
            pairs.append((encode_prompt(tokenizer, example.prompt), _completion_ids(tokenizer, example.completion, eos),
                          False))
            if chat_too and chat_template:
                user = [ChatMessage("user", example.prompt.strip())]
                pairs.append((render_chat(tokenizer, user),
                              _completion_ids(tokenizer, example.completion.strip(), turn_end), True))
        for prompt_ids, completion_ids, chat in pairs:
            if not prompt_ids:
                # The first completion token needs a token before it to be predicted from.
                raise ValueError(f"example {index} has an empty prompt (0 tokens); give it some text")
            total = len(prompt_ids) + len(completion_ids)
            if total > max_length:
                form = " as chat" if chat and not example.is_chat else ""
                raise ValueError(f"example {index}{form} has {total} tokens (prompt {len(prompt_ids)} + completion "
                                 f"{len(completion_ids)} with EOS); max_length is {max_length}")
            out.append(TokenizedExample(tuple(prompt_ids), tuple(completion_ids), source=index, chat=chat))
    return out


def _completion_ids(tokenizer, text: str, end: int) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [end]
