"""The commands: `upload` and `prefixes` against a running server, and `serve` as a real
process that starts and owns its redis-server, prints its admin key and drains on SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import redis
import torch

from server.cli import main
from tests.api.harness import free_port
from tests.factories import peft_prefix_model, tiny_llama


@pytest.fixture(scope="module")
def adapter_dir(vocab, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("adapter")
    peft_prefix_model(tiny_llama(0, vocab), 4, seed=41).save_pretrained(folder)
    return folder


def test_upload_and_prefixes_commands(stack, tenant_key, adapter_dir, capsys, tmp_path):
    common = ["--url", stack.url, "--key", tenant_key]
    assert main(["upload", "cli-bot", str(adapter_dir), "--description", "from the cli", *common]) == 0
    assert '"status": "created"' in capsys.readouterr().out
    assert main(["upload", "cli-bot", str(adapter_dir / "adapter_model.safetensors"), "--num-virtual-tokens", "4",
                 *common]) == 0
    assert '"status": "replaced"' in capsys.readouterr().out
    assert main(["prefixes", "list", *common]) == 0
    assert "cli-bot" in capsys.readouterr().out
    assert main(["prefixes", "get", "cli-bot", *common]) == 0
    assert '"num_virtual_tokens": 4' in capsys.readouterr().out
    assert main(["prefixes", "delete", "cli-bot", *common]) == 0
    assert main(["prefixes", "delete", "cli-bot", *common]) == 1
    assert "not found" in capsys.readouterr().err
    pickled = tmp_path / "old-adapter"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text("{}")
    torch.save({}, pickled / "adapter_model.bin")
    with pytest.raises(SystemExit, match="pickle"):
        main(["upload", "x", str(pickled), *common])
    assert main(["prefixes", "list", "--url", f"http://127.0.0.1:{free_port()}", "--key", "k"]) == 1
    assert "cannot reach the server" in capsys.readouterr().err


def _arena_segments(pid: int) -> list[str]:
    from server.engine.prefix_arena import SEGMENT_PREFIX

    return [n for n in os.listdir("/dev/shm") if n.startswith(f"{SEGMENT_PREFIX}{pid}-")]


def _start_serve(tmp: str, vocab, tokenizer, port: int, redis_url: str) -> subprocess.Popen:
    model_dir, cache_dir = Path(tmp) / "model", Path(tmp) / "cache"
    tiny_llama(0, vocab).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFIX_SERVE_")}
    return subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir), "--port", str(port),
         "--cache-dir", str(cache_dir), "--kv-cache-bytes", str(1 << 20), "--dtype", "float32",
         "--device", "cpu", "--log-level", "warning", "--redis-url", redis_url, "--namespace", "arena-kill",
         "--workers", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=Path(__file__).parents[2])


def test_a_serve_killed_leaves_no_shared_memory_and_the_next_one_makes_its_own(redis_server, vocab, tokenizer):
    """SIGKILL gives serve no chance to unlink its prefix arena: multiprocessing's resource
    tracker does, once serve and its engine process are gone; a new serve makes its own."""
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        try:
            for _ in range(2):
                proc = _start_serve(tmp, vocab, tokenizer, free_port(), redis_server.url)
                procs.append(proc)
                out = ""
                for line in proc.stdout:
                    out += line
                    if "serving on" in line:
                        break
                assert "serving on" in out, out
                assert len(_arena_segments(proc.pid)) == 1
                proc.kill()
                proc.wait(30)
                deadline = time.monotonic() + 60  # the engine process sees its pipe close, then the tracker
                while _arena_segments(proc.pid) and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert _arena_segments(proc.pid) == []
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


def test_serve_owns_redis_prints_its_key_and_drains_on_sigterm(vocab, tokenizer):
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, cache_dir = Path(tmp) / "model", Path(tmp) / "cache"
        tiny_llama(0, vocab).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFIX_SERVE_")}
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir), "--port", str(port),
             "--cache-dir", str(cache_dir), "--kv-cache-bytes", str(1 << 20), "--dtype", "float32",
             "--device", "cpu", "--log-level", "warning"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=Path(__file__).parents[2])
        redis_url = None
        try:
            lines = []
            for line in proc.stdout:
                lines.append(line)
                if "admin key:" in line:
                    break
            out = "".join(lines)
            assert "admin key:" in out, out
            key = out.split("admin key: ")[1].split()[0]
            redis_url = out.split("started redis-server at ")[1].split()[0]
            assert f"serving on http://127.0.0.1:{port}" in out
            assert (cache_dir / "admin_key").read_text().strip() == key
            assert (cache_dir / "admin_key").stat().st_mode & 0o077 == 0  # only the owner can read it
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{url}/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline and proc.poll() is None, "server never got ready"
                time.sleep(0.1)
            r = httpx.post(f"{url}/v1/admin/tenants", json={"tenant_id": "acme"},
                           headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 201
            assert redis.Redis.from_url(redis_url).config_get("appendonly")["appendonly"] == "yes"
            assert (cache_dir / "redis").is_dir()
            assert len(_arena_segments(proc.pid)) == 1  # the prefix arena of serve's engine process
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
            assert _arena_segments(proc.pid) == []  # unlinked at shutdown
            with pytest.raises(redis.ConnectionError):  # its redis-server is gone with it
                redis.Redis.from_url(redis_url, socket_connect_timeout=1).ping()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if redis_url is not None:  # a failed run must not leave its redis-server behind
                with contextlib.suppress(redis.RedisError):
                    redis.Redis.from_url(redis_url, socket_connect_timeout=1).shutdown(nosave=True)
