"""The `prefix-serve` command: one subcommand per module in server/commands/.

Each command module has `add_arguments(parser)` and `run(args) -> int`, and is imported
only when its subcommand runs, so `prefix-serve generate` never loads the HTTP stack.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "serve": "run the HTTP server (starts a local redis-server unless --redis-url is given)",
    "generate": "one-off generation with the engine, no server",
    "upload": "upload a prefix to a running server",
    "prompt-prefix": "have a running server compute a prefix from a text (a system prompt)",
    "prefixes": "list or delete prefixes on a running server",
    "worker": "run personalization training jobs from the Redis queue",
    "train": "train a prefix offline from a jsonl or csv file",
    "eval": "BLEU of a prefix on a table-to-text file",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="prefix-serve", description="Serve prefix-tuned language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            _module(name).add_arguments(p)
    args = parser.parse_args(argv)
    return int(_module(args.command).run(args) or 0)


def _module(name: str):
    return importlib.import_module(f"server.commands.{name.replace('-', '_')}")


if __name__ == "__main__":
    raise SystemExit(main())
