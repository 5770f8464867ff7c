"""What the client commands (`upload`, `prefixes`) share: where the server is, which key to
send, and turning an error response into one readable line."""

from __future__ import annotations

import argparse
import os
import sys

import httpx

from server.engine.model_loader import default_cache_dir

DEFAULT_URL = "http://127.0.0.1:8000"


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("PREFIX_SERVE_URL", DEFAULT_URL),
                        help=f"the server (env PREFIX_SERVE_URL, default {DEFAULT_URL})")
    parser.add_argument("--key", default=None,
                        help="API key (env PREFIX_SERVE_API_KEY, else PREFIX_SERVE_ADMIN_KEY, else the key "
                             "a local `prefix-serve serve` saved in the cache dir)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the server")


def api_key(args: argparse.Namespace) -> str | None:
    if args.key:
        return args.key
    for name in ("PREFIX_SERVE_API_KEY", "PREFIX_SERVE_ADMIN_KEY"):
        if os.environ.get(name):
            return os.environ[name]
    saved = default_cache_dir() / "admin_key"
    return saved.read_text().strip() if saved.exists() else None


def client(args: argparse.Namespace) -> httpx.Client:
    key = api_key(args)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=args.url.rstrip("/"), headers=headers, timeout=args.timeout)


def fail(response: httpx.Response, what: str) -> int:
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:500]
    print(f"prefix-serve: {what} failed ({response.status_code}): {message}", file=sys.stderr)
    return 1


def unreachable(url: str, e: Exception) -> int:
    print(f"prefix-serve: cannot reach the server at {url} ({e}); is `prefix-serve serve` running?",
          file=sys.stderr)
    return 1
