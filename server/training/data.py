"""Training examples: read from jsonl or csv files, and tokenized for the trainer.

- jsonl: one `{"prompt": ..., "completion": ...}` object per line.
- csv: the E2E table-to-text layout (`mr,ref` columns, several refs per mr); the prompt is
  built from the meaning representation by `table_prompt`, the completion is " " + ref.

Tokenization: the prompt as the tokenizer encodes a request's prompt (its special tokens
included, as serving does), then the completion without special tokens, then EOS, so a
trained prefix learns to stop.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from server.engine.tokenization import encode_text


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str


@dataclass(frozen=True)
class TokenizedExample:
    prompt_ids: tuple[int, ...]  # input only: masked out of the loss
    completion_ids: tuple[int, ...]  # the targets, EOS last

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
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not JSON: {e.msg}") from e
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) \
                or not isinstance(row.get("completion"), str):
            raise ValueError(f"{path}:{number}: expected {{\"prompt\": str, \"completion\": str}}")
        if not row["completion"]:
            raise ValueError(f"{path}:{number}: empty completion")
        examples.append(Example(row["prompt"], row["completion"]))
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


def tokenize(tokenizer, examples: list[Example], max_length: int) -> list[TokenizedExample]:
    """Token ids for each example; raises naming the first example longer than max_length."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; a trained prefix could never stop")
    out = []
    for index, example in enumerate(examples):
        prompt_ids = encode_prompt(tokenizer, example.prompt)
        completion_ids = list(tokenizer(example.completion, add_special_tokens=False)["input_ids"]) + [eos]
        if not prompt_ids:
            # The first completion token needs a token before it to be predicted from.
            raise ValueError(f"example {index} has an empty prompt (0 tokens); give it some text")
        total = len(prompt_ids) + len(completion_ids)
        if total > max_length:
            raise ValueError(f"example {index} has {total} tokens (prompt {len(prompt_ids)} + completion "
                             f"{len(completion_ids)} with EOS); max_length is {max_length}")
        out.append(TokenizedExample(tuple(prompt_ids), tuple(completion_ids)))
    return out
