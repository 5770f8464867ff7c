"""Settings: one place, env vars and flags (flags win), and the admin-key rule."""

from __future__ import annotations

import argparse

import pytest
from pydantic import ValidationError

from server.config import Settings, add_settings_arguments, is_loopback, settings_from_args


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    return parser.parse_args(argv)


def test_every_setting_has_a_flag_and_flags_override_env(monkeypatch):
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    flags = {a.dest for a in parser._actions}
    assert set(Settings.model_fields) <= flags
    monkeypatch.setenv("PREFIX_SERVE_PORT", "9001")
    monkeypatch.setenv("PREFIX_SERVE_MAX_QUEUE", "7")
    assert settings_from_args(parse([])).port == 9001
    s = settings_from_args(parse(["--port", "9002", "--kv-cache-bytes", "1048576", "--no-shared-prefixes"]))
    assert (s.port, s.max_queue, s.kv_cache_bytes, s.shared_prefixes) == (9002, 7, 1 << 20, False)
    assert s.engine_config().kv_cache_bytes == 1 << 20


def test_bad_values_name_the_setting(monkeypatch):
    with pytest.raises(ValidationError, match="port"):
        settings_from_args(parse(["--port", "http"]))
    with pytest.raises(ValidationError, match="dtype"):
        settings_from_args(parse(["--dtype", "int4"]))


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_needs_no_admin_key(monkeypatch, host):
    monkeypatch.delenv("PREFIX_SERVE_ADMIN_KEY", raising=False)
    assert is_loopback(host)
    assert Settings(host=host).admin_key is None


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "example.com", "::"])
def test_non_loopback_without_admin_key_refuses_to_start(monkeypatch, capsys, host):
    monkeypatch.delenv("PREFIX_SERVE_ADMIN_KEY", raising=False)
    with pytest.raises(ValidationError, match="admin key is required"):
        Settings(host=host)
    assert Settings(host=host, admin_key="k" * 20).host == host
    from server.cli import main

    assert main(["serve", "--host", host]) == 2  # refuses before starting anything
    assert "PREFIX_SERVE_ADMIN_KEY" in capsys.readouterr().err


def test_short_admin_key_is_refused():
    with pytest.raises(ValidationError, match="at least 16"):
        Settings(admin_key="short")
