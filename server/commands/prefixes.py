"""`prefix-serve prefixes [list|get ID|delete ID]`: the caller's prefixes on a running server."""

from __future__ import annotations

import argparse
import json
from datetime import datetime

import httpx

from server.commands._client import add_client_arguments, client, client_settings, fail, unreachable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", choices=("list", "get", "delete"), default="list")
    parser.add_argument("prefix_id", nargs="?", metavar="ID", help="for get and delete")
    parser.add_argument("--json", action="store_true", help="print the server's JSON")
    add_client_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.action in ("get", "delete") and not args.prefix_id:
        print(f"prefix-serve prefixes {args.action}: give the prefix ID")
        return 2
    try:
        with client(args) as c:
            if args.action == "list":
                r = c.get("/v1/prefixes")
            elif args.action == "get":
                r = c.get(f"/v1/prefixes/{args.prefix_id}")
            else:
                r = c.delete(f"/v1/prefixes/{args.prefix_id}")
    except httpx.TransportError as e:
        return unreachable(client_settings(args).url, e)
    if r.status_code >= 400:
        return fail(r, f"{args.action} {args.prefix_id or ''}".strip())
    if args.action == "delete":
        print(f"deleted {args.prefix_id}")
    elif args.json or args.action == "get":
        print(json.dumps(r.json(), indent=2))
    else:
        _table(r.json()["data"])
    return 0


def _table(rows: list[dict]) -> None:
    if not rows:
        print("no prefixes")
        return
    print(f"{'ID':<32} {'VERSION':<16} {'TOKENS':>6} {'DTYPE':<9} {'BYTES':>10}  CREATED")
    for p in rows:
        created = datetime.fromtimestamp(p["created_at"]).strftime("%Y-%m-%d %H:%M")
        print(f"{p['id']:<32} {p['version']:<16} {p['num_virtual_tokens']:>6} {p['dtype']:<9} "
              f"{p['bytes']:>10}  {created}")
