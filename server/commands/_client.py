"""What the client commands (`upload`, `prefixes`) share: where the server is, which key to
send, and turning an error response into one readable line. No torch is imported here."""

from __future__ import annotations

import argparse
import sys

import httpx
from pydantic import ValidationError

from server.commands.serve import ADMIN_KEY_FILE
from server.config import CLIENT_FIELDS, Settings, add_settings_arguments, first_error, settings_from_args


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, CLIENT_FIELDS)


def client_settings(args: argparse.Namespace) -> Settings:
    try:
        return settings_from_args(args)
    except ValidationError as e:
        raise SystemExit(f"prefix-serve: {first_error(e)}") from e


def api_key(settings: Settings) -> str | None:
    """--api-key (PREFIX_SERVE_API_KEY), else the admin key, else the one a local serve saved."""
    for key in (settings.api_key, settings.admin_key):
        if key is not None:
            return key.get_secret_value()
    saved = settings.cache_dir / ADMIN_KEY_FILE
    return saved.read_text().strip() if saved.exists() else None


def client(args: argparse.Namespace) -> httpx.Client:
    settings = client_settings(args)
    key = api_key(settings)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=settings.url.rstrip("/"), headers=headers, timeout=settings.client_timeout_s)


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
