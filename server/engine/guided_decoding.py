"""Structured output: decoding held to a regular expression (a JSON schema, made into one).

    JSON schema --json_schema_regex()--> regex       (the API, once per request: fast, checks the schema)
    regex --GuideCompiler.index()--> Index            (the engine, once per regex: an automaton over
                                                       the tokenizer's tokens; cached)
    Index --Guide--> each step: the tokens allowed next (a bitmask over the vocabulary), then advance

outlines-core does the regex and automaton work. This file maps a tokenizer's tokens to the
bytes they stand for, applies a step's masks to the logits rows that asked, and keeps the
compiled automata in a small LRU.

# NOTE: the mask changes only what is sampled. Logprobs stay those of the raw logits (as
# everywhere in the engine), so a constrained request's logprobs are the model's own.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from server.engine.request import RequestError
from server.engine.sampling_params import MAX_REGEX_CHARS

MAX_SCHEMA_CHARS = 16_384  # a schema's JSON text; bounds the automaton's size and compile time


class GuideError(RequestError):
    """A schema or regex that cannot guide decoding; the message says why (a 400)."""


def json_schema_regex(schema: dict | None) -> str:
    """The regex of the JSON text that `schema` accepts; None: any JSON object."""
    from outlines_core.json_schema import build_regex_from_schema

    text = json.dumps({"type": "object"} if schema is None else schema)  # key order kept: properties come in it
    if len(text) > MAX_SCHEMA_CHARS:
        raise GuideError(f"the JSON schema is {len(text)} characters; at most {MAX_SCHEMA_CHARS} are allowed")
    try:
        regex = build_regex_from_schema(text)
    except Exception as e:  # noqa: BLE001 - outlines-core raises several types for bad schemas
        raise GuideError(f"the JSON schema cannot be used for constrained decoding: {e}") from None
    if len(regex) > MAX_REGEX_CHARS:
        raise GuideError(f"the JSON schema makes a pattern of {len(regex)} characters; at most "
                         f"{MAX_REGEX_CHARS} are allowed (simplify the schema)")
    return regex


def token_bytes(tokenizer) -> dict[int, bytes]:
    """The bytes each ordinary token id stands for (special tokens left out).

    Byte-level BPE (GPT-2, Llama 3, SmolLM2, Qwen) spells bytes as printable characters;
    SentencePiece spells a space as U+2581 and raw bytes as <0xNN>."""
    special = set(tokenizer.all_special_ids)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    byte_of = {ch: b for b, ch in _byte_level_alphabet().items()}
    byte_level = all(c in byte_of for tid, p in enumerate(pieces) if tid not in special and p for c in p)
    out: dict[int, bytes] = {}
    for tid, piece in enumerate(pieces):
        if tid in special or not piece:
            continue
        if byte_level:
            if all(c in byte_of for c in piece):
                out[tid] = bytes(byte_of[c] for c in piece)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out[tid] = bytes([int(piece[3:5], 16)])
        else:
            out[tid] = piece.replace("\u2581", " ").encode("utf-8")
    return out


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable bytes stand for themselves, the
    others take the characters from U+0100 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class GuideCompiler:
    """The engine's compiled automata, one per regex (LRU of `capacity`; a pattern that failed
    is remembered too, so sending it again costs nothing). Each compile runs in a child
    process (server/engine/guide_compile.py) killed after `timeout_s`. Thread-safe: the
    engine process compiles off its step loop."""

    def __init__(self, tokenizer, eos_token_id: int, capacity: int = 32, timeout_s: float = 20.0) -> None:
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.capacity = capacity
        self.timeout_s = timeout_s
        self._by_bytes: dict[bytes, list[int]] | None = None
        self._indexes: OrderedDict[str, object] = OrderedDict()  # regex -> Index, or the GuideError it gave
        self._lock = threading.Lock()

    @classmethod
    def for_engine(cls, tokenizer, eos_token_ids, timeout_s: float) -> "GuideCompiler | None":
        """An engine's compiler (None without a tokenizer): a pattern ends with the
        tokenizer's EOS, or the model's lowest EOS id where the tokenizer names none."""
        if tokenizer is None:
            return None
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else min(eos_token_ids)
        return cls(tokenizer, eos, timeout_s=timeout_s)

    def has(self, regex: str) -> bool:
        with self._lock:
            return regex in self._indexes

    def index(self, regex: str):
        """The compiled automaton of `regex` (compiled now if not cached; raises GuideError)."""
        with self._lock:
            if regex in self._indexes:
                self._indexes.move_to_end(regex)
                found = self._indexes[regex]
                if isinstance(found, GuideError):
                    raise found
                return found
            if self._by_bytes is None:
                self._by_bytes = {}
                for tid, b in token_bytes(self.tokenizer).items():
                    self._by_bytes.setdefault(b, []).append(tid)
            by_bytes = self._by_bytes
        try:
            found = self._compile(regex, by_bytes)
        except GuideError as e:
            found = e
        with self._lock:
            self._indexes[regex] = found
            while len(self._indexes) > self.capacity:
                self._indexes.popitem(last=False)
        if isinstance(found, GuideError):
            raise found
        return found

    def _compile(self, regex: str, by_bytes: dict[bytes, list[int]]):
        child = subprocess.Popen([sys.executable, "-m", "server.engine.guide_compile"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            out, _ = child.communicate(pickle.dumps((regex, self.eos_token_id, by_bytes)), timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            raise GuideError(f"the pattern did not compile within {self.timeout_s:g} s (a long maxLength, maxItems "
                             "or repetition in a pattern makes it large): simplify the schema") from None
        if child.returncode != 0 or not out:
            raise GuideError(f"compiling the pattern failed (the compiler exited with code {child.returncode})")
        status, value = pickle.loads(out)  # our own child's output
        if status != "ok":
            raise GuideError(f"the pattern cannot be followed with this model's tokens: {value}")
        return value

    def guide(self, regex: str):
        """A fresh decoding state for one request (its own position in the automaton)."""
        import outlines_core

        return outlines_core.Guide(self.index(regex))


class PendingCompiles:
    """Add commands whose pattern is not compiled yet, held while it compiles on a thread off
    the step loop (an engine process's loop: EngineCore, Seq2SeqCore). A command is anything
    with `request_id` and `sampling`."""

    def __init__(self, guides: GuideCompiler | None) -> None:
        self.guides = guides
        self._pending: dict[str, tuple[Future, object]] = {}
        self._pool: ThreadPoolExecutor | None = None

    def __bool__(self) -> bool:
        return bool(self._pending)

    def __iter__(self):  # the ids of the requests that wait
        return iter(list(self._pending))

    def defer(self, cmd) -> bool:
        """True if `cmd` now waits for its pattern to compile (it comes back from `ready`)."""
        regex = cmd.sampling.guided_regex
        if regex is None or self.guides is None or self.guides.has(regex):
            return False
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="guide-compiler")
        self._pending[cmd.request_id] = (self._pool.submit(self.guides.index, regex), cmd)
        return True

    def discard(self, request_id: str) -> None:
        self._pending.pop(request_id, None)

    def drain(self, add, reject) -> None:
        """Hand each command whose compile has ended to `add(cmd)`, or to
        `reject(request_id, error)` when its pattern failed to compile."""
        for request_id, (future, cmd) in list(self._pending.items()):
            if future.done():
                del self._pending[request_id]
                error = future.exception()
                if error is None:
                    add(cmd)
                else:
                    reject(request_id, error)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def advance_guides(tokens: list, rows: list[int], guides: list, eos_token_ids) -> None:
    """Move each guided row's automaton past its sampled token; where that raises, the row's
    token becomes the exception (that request fails alone). EOS ends the request (its
    pattern allowed it): nothing to advance."""
    for i, guide in zip(rows, guides):
        if not isinstance(tokens[i], Exception) and tokens[i] not in eos_token_ids:
            try:
                guide.advance(tokens[i], return_tokens=False)
            except Exception as e:  # noqa: BLE001
                tokens[i] = e


def mask_logits(logits: torch.Tensor, rows: list[int], guides: list) -> torch.Tensor:
    """A copy of logits [N, V] whose rows `rows` keep only the tokens their guide allows (the
    others -inf). Ids past the tokenizer's (the model's padding rows) are never allowed."""
    n_words = (logits.shape[1] + 31) // 32
    words = torch.zeros(len(rows), n_words, dtype=torch.int32)
    for i, guide in enumerate(guides):
        guide.write_mask_into(words[i].data_ptr(), n_words, 4)
    bits = (words[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1  # [R, W, 32]
    allowed = bits.view(len(rows), -1)[:, :logits.shape[1]].bool().to(logits.device)
    out = logits.clone()
    index = torch.tensor(rows, device=logits.device)
    out[index] = logits[index].masked_fill(~allowed, float("-inf"))
    return out
