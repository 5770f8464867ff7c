"""`prefix-serve prompt-prefix ID (--text TEXT | --file PATH | --messages PATH)`: have a
running server compute a prefix from a text (a long system prompt, a few-shot block) and
store it as ID. The server runs the frozen model over the text once; every request that
names ID then starts after that text without prefilling it again.

--messages PATH reads a JSON list of {"role", "content"} chat messages (the chat template
is applied up to the end of the last one).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import httpx

from server.commands._client import add_client_arguments, client, client_settings, fail, unreachable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prefix_id", metavar="ID", help="the prefix id to create or replace")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the text itself")
    source.add_argument("--file", type=Path, help="a UTF-8 text file")
    source.add_argument("--messages", type=Path, help='a JSON file: [{"role": ..., "content": ...}, ...]')
    parser.add_argument("--description", default="", help="a note stored with the prefix")
    parser.add_argument("--shared", action="store_true",
                        help="admin key only: every tenant may use the prefix as shared/<ID>")
    add_client_arguments(parser)


def body(args: argparse.Namespace) -> dict:
    out: dict = {"description": args.description, "shared": args.shared}
    if args.messages is not None:
        try:
            out["messages"] = json.loads(args.messages.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise SystemExit(f"prefix-serve: cannot read messages from {args.messages}: {e}") from e
    elif args.file is not None:
        try:
            out["text"] = args.file.read_text(encoding="utf-8")
        except OSError as e:
            raise SystemExit(f"prefix-serve: cannot read {args.file}: {e}") from e
    else:
        out["text"] = args.text
    return out


def run(args: argparse.Namespace) -> int:
    payload = body(args)
    try:
        with client(args) as c:
            r = c.put(f"/v1/prefixes/{args.prefix_id}", json=payload)
    except httpx.TransportError as e:
        return unreachable(client_settings(args).url, e)
    if r.status_code not in (200, 201):
        return fail(r, f"prompt prefix {args.prefix_id}")
    print(json.dumps({"status": "created" if r.status_code == 201 else "replaced", **r.json()}, indent=2))
    return 0
