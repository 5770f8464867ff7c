"""`prefix-serve serve` as a child process on 127.0.0.1 (what a replica is), and a tiny
model folder for it to load."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from prefix_store.redis_process import free_port
from tests.api.harness import ADMIN_KEY
from tests.factories import tiny_llama
from tests.processes import START_BOUND_S, log_tail, stop_process

REPO = Path(__file__).resolve().parents[2]


def save_tiny_model(folder: Path, vocab: int, tokenizer) -> Path:
    """tiny_llama(0, vocab) and the tiny tokenizer as a HF folder `serve --model` loads."""
    tiny_llama(0, vocab).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class ServerProcess:
    def __init__(self, model_dir: Path, redis_url: str, workdir: Path, name: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"{name}.log"
        self.args = [sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir),
                     "--redis-url", redis_url, "--host", "127.0.0.1", "--port", str(self.port),
                     "--admin-key", ADMIN_KEY, "--cache-dir", str(workdir / f"{name}-cache"),
                     "--device", "cpu", "--dtype", "float32", "--kv-cache-bytes", str(4 << 20),
                     "--drain-timeout-s", "2", "--log-level", "warning"]
        self._proc: subprocess.Popen | None = None

    def start(self) -> "ServerProcess":
        # Only our flags decide: PREFIX_SERVE_* of the calling shell must not leak in.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFIX_SERVE_")}
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(self.args, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout: float = START_BOUND_S) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is None or self._proc.poll() is not None:
                raise RuntimeError(f"prefix-serve serve exited while starting:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"prefix-serve serve not ready within {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def client(self, key: str | None = ADMIN_KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def log_tail(self, n: int = 30) -> str:
        return log_tail(self.log_path, n)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        stop_process(proc, 20)  # SIGTERM: uvicorn drains and exits
