"""A real `prefix-serve serve` process on 127.0.0.1 for the reliability tests, on the tiny
Llama and byte tokenizer of the training tests (saved to a folder), and the processes
around it that the fault tests kill: its owned redis-server, its engine process, its
training workers.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save

from prefix_store.redis_process import free_port
from server.prefix import ModelSpec
from tests.processes import START_BOUND_S, log_tail
from tests.training.conftest import make_byte_tokenizer, make_tiny_llama

ADMIN_KEY = "reliability-admin-key-0123456789"
REPO = Path(__file__).resolve().parents[2]


def save_model(folder: Path) -> Path:
    if not (folder / "config.json").exists():
        make_tiny_llama().save_pretrained(folder)
        make_byte_tokenizer().save_pretrained(folder)
    return folder


def random_prefix(seed: int, length: int = 4) -> bytes:
    """A safetensors upload (prefix_kv) for the tiny Llama."""
    spec = ModelSpec.from_hf(make_tiny_llama())
    kv = torch.randn(spec.kv_shape(length), generator=torch.Generator().manual_seed(seed))
    return save({"prefix_kv": kv})


def wait_for(predicate, timeout: float, what: str, serve: "Serve | None" = None):
    """Poll until predicate() is truthy (returns it). The bound only keeps a broken run from
    hanging; nothing asserts on how long it took."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}" + (f"\nserve log:\n{serve.log_tail(60)}" if serve else ""))
        time.sleep(0.05)


class Serve:
    """`prefix-serve serve` with the flags given; without `redis_url` it owns its redis-server,
    with its data under `<workdir>/cache/redis` (kept across restarts of this object)."""

    def __init__(self, workdir: Path, *args: str, redis_url: str | None = None, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cache_dir = workdir / "cache"
        self.log_path = workdir / "serve.log"
        self.args = [sys.executable, "-m", "server.cli", "serve", "--model", str(save_model(workdir / "model")),
                     "--host", "127.0.0.1", "--port", str(self.port), "--admin-key", ADMIN_KEY,
                     "--cache-dir", str(self.cache_dir), "--device", "cpu", "--dtype", "float32",
                     "--kv-cache-bytes", str(4 << 20), "--log-level", "info", *args]
        if redis_url is not None:
            self.args += ["--redis-url", redis_url]
        self.proc: subprocess.Popen | None = None
        self._log_offset = 0

    def start(self, timeout: float = START_BOUND_S) -> "Serve":
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFIX_SERVE_")}
        env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)

        def ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"serve exited with {self.proc.returncode}:\n{self.log_tail(60)}")
            try:
                return httpx.get(f"{self.url}/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout, "serve to be ready", self)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        """This run's log (since the last start)."""
        with open(self.log_path, "rb") as f:
            f.seek(self._log_offset)
            return f.read().decode(errors="replace")

    def log_tail(self, n: int = 30) -> str:
        return log_tail(self.log_path, n)

    def client(self, key: str | None = ADMIN_KEY, timeout: float = 60.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def create_tenant(self, tenant_id: str) -> str:
        with self.client() as c:
            r = c.post("/v1/admin/tenants", json={"tenant_id": tenant_id})
        assert r.status_code == 201, r.text
        return r.json()["api_key"]

    def redis_pid(self) -> int:
        """The owned redis-server (from the pid file it writes)."""
        return int((self.cache_dir / "redis" / "redis.pid").read_text().strip())

    def redis_url(self) -> str:
        return re.findall(r"started redis-server at (\S+)", self.log())[-1]

    def engine_pid(self) -> int:
        """The engine process of this run (a restart starts a new one)."""
        return int(re.findall(r"engine process started \(pid (\d+)\)", self.log())[-1])

    def worker_pids(self) -> list[int]:
        return [int(p) for p in re.findall(r"training worker \d+ started \(pid (\d+)\)", self.log())]

    def descendants(self) -> list[int]:
        """Every process below serve: the engine process, workers, and the redis-server it owns
        (in a session of its own, so a Ctrl-C meant for serve does not reach it)."""
        found, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            try:
                for task in Path(f"/proc/{pid}/task").iterdir():
                    children = [int(c) for c in (task / "children").read_text().split()]
                    found += children
                    todo += children
            except OSError:
                continue
        return found

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        """Signal serve and wait for it; its exit code (None if it had to be killed)."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def kill_everything(self) -> None:
        """A crash of the machine, as far as this can show one: SIGKILL to serve, every process
        below it and its redis-server, all at once (nothing gets to flush or say goodbye)."""
        pids = [self.pid, *self.descendants()]
        try:
            pids.append(self.redis_pid())
        except (OSError, ValueError):
            pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(30)
        for pid in pids:  # the grandchildren are reaped by init; wait until they are gone
            wait_for(lambda: not Path(f"/proc/{pid}").exists() or _is_zombie(pid), 30, f"pid {pid} to die")

    def close(self) -> None:
        """Stop serve if it runs (its owned redis-server with it) and anything it left behind."""
        leftovers = self.descendants() if self.proc is not None and self.proc.poll() is None else []
        self.stop()
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            pid = self.redis_pid()
            if Path(f"/proc/{pid}/cwd").resolve() == (self.cache_dir / "redis").resolve():
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True
