"""Settings: one place, env vars and flags (flags win), and the admin-key rule."""

from __future__ import annotations

import argparse

import pytest
from pydantic import ValidationError

from server.config import (CLIENT_FIELDS, SERVER_FIELDS, WORKER_FIELDS, Settings, add_settings_arguments, is_loopback,
                           settings_from_args)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    return parser.parse_args(argv)


def test_every_setting_has_a_flag_and_flags_override_env(monkeypatch):
    flags = set()
    for fields in (SERVER_FIELDS, WORKER_FIELDS, CLIENT_FIELDS):
        parser = argparse.ArgumentParser()
        add_settings_arguments(parser, fields)
        flags |= {a.dest for a in parser._actions}
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
    with pytest.raises(ValueError, match="admin key is required"):
        Settings(host=host).check_serving()
    Settings(host=host, admin_key="k" * 20).check_serving()
    from server.cli import main

    assert main(["serve", "--host", host]) == 2  # refuses before starting anything
    assert "PREFIX_SERVE_ADMIN_KEY" in capsys.readouterr().err


def test_short_admin_key_is_refused():
    with pytest.raises(ValidationError, match="at least 16"):
        Settings(admin_key="short")


def test_the_worker_and_client_commands_read_the_same_settings(monkeypatch):
    """One Settings class: env vars and defaults are the same for every command, and the
    worker's and the client's older flag names still work."""
    monkeypatch.setenv("PREFIX_SERVE_JOB_CLAIM_TIMEOUT_S", "12.5")
    monkeypatch.setenv("PREFIX_SERVE_URL", "http://10.0.0.9:8000")
    worker, client = argparse.ArgumentParser(), argparse.ArgumentParser()
    add_settings_arguments(worker, WORKER_FIELDS)
    add_settings_arguments(client, CLIENT_FIELDS)
    w = settings_from_args(worker.parse_args(["--dtype", "bfloat16", "--mid-dim", "64", "--redis-url", "redis://x"]))
    assert (w.job_claim_timeout_s, w.train_dtype, w.train_mid_dim, w.redis_url) == (12.5, "bfloat16", 64, "redis://x")
    c = settings_from_args(client.parse_args(["--key", "ps-abc", "--timeout", "5"]))
    assert (c.url, c.api_key.get_secret_value(), c.client_timeout_s) == ("http://10.0.0.9:8000", "ps-abc", 5.0)


def test_the_client_commands_import_no_torch():
    import subprocess
    import sys

    code = ("import sys, server.cli, server.commands.upload, server.commands.prefixes; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]")
    subprocess.run([sys.executable, "-c", code], check=True)
