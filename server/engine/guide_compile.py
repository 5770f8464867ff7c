"""The child process that compiles one pattern into an automaton over a tokenizer's tokens.

    parent --stdin: pickle (regex, eos_token_id, {token bytes: [ids]})--> child
    child  --stdout: pickle ("ok", Index) or ("error", message)--> parent

Run as `python -m server.engine.guide_compile`; it imports only outlines-core. A pattern's
compile time is not predictable from its size (a JSON string of maxLength 10 compiles in
0.1 s and one of 20 in 90 s with SmolLM2's tokens), so the parent runs each compile here,
where a deadline can kill it (server/engine/guided_decoding.py).
"""

from __future__ import annotations

import pickle
import sys


def main() -> None:
    regex, eos_token_id, by_bytes = pickle.load(sys.stdin.buffer)
    try:
        import outlines_core

        result = ("ok", outlines_core.Index(regex, outlines_core.Vocabulary(eos_token_id, by_bytes)))
    except Exception as e:  # noqa: BLE001 - the parent reports it
        result = ("error", str(e))
    pickle.dump(result, sys.stdout.buffer)
    sys.stdout.buffer.flush()


if __name__ == "__main__":
    main()
