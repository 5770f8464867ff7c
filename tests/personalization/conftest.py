"""A real `prefix-serve serve` process (with its supervised training worker process) on a
tiny Llama saved to a folder, with its own redis-server; and helpers to drive it over HTTP."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from prefix_store.redis_process import RedisServer
from tests.api.harness import free_port
from tests.training.conftest import make_byte_tokenizer, make_tiny_llama
from tests.processes import START_BOUND_S

ADMIN_KEY = "personalization-admin-key-0123456789"
ROOT = Path(__file__).resolve().parents[2]
# Limits the tests hit on purpose (and room for a long job to cancel or kill).
LIMITS = {"--max-jobs-per-tenant": 2, "--max-train-examples": 4, "--max-train-example-tokens": 64,
          "--max-train-steps": 20000, "--max-train-virtual-tokens": 32}
CLAIM_TIMEOUT_S = 6  # a killed worker's job is taken over after this much silence


@dataclass
class Service:
    url: str
    proc: subprocess.Popen
    log_path: Path
    redis: RedisServer
    model_dir: Path

    def client(self, key: str | None = ADMIN_KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60.0)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> list[int]:
        """The training workers serve started, oldest first (from its log)."""
        return [int(p) for p in re.findall(r"training worker \d+ started \(pid (\d+)\)", self.log())]

    def create_tenant(self, tenant_id: str) -> str:
        with self.client() as c:
            r = c.post("/v1/admin/tenants", json={"tenant_id": tenant_id})
        assert r.status_code == 201, r.text
        return r.json()["api_key"]


def wait_for(predicate, timeout: float, what: str, log: Service | None = None):
    """Poll until predicate() is truthy (returns it); fail naming `what` (never a timing assertion
    on the behaviour itself: the bound only keeps a broken run from hanging)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}" + (f"\nserver log:\n{log.log()[-4000:]}" if log else ""))
        time.sleep(0.05)


def wait_while_advancing(observe, done, what: str, log: Service | None = None, stall_s: float = 120.0):
    """Poll observe() until done(value) (returns that value). The bound is on a stall, not on
    the whole wait: it fails only when what the server reports (a job's status, attempt and
    step, say) has not changed for stall_s seconds. A long job on a busy machine takes as long
    as it takes; a stuck one fails."""
    last, changed = object(), time.monotonic()
    while True:
        value = observe()
        if done(value):
            return value
        if value != last:
            last, changed = value, time.monotonic()
        elif time.monotonic() - changed > stall_s:
            pytest.fail(f"timed out waiting for {what}: nothing changed for {stall_s:.0f} s (last seen {value!r})"
                        + (f"\nserver log:\n{log.log()[-4000:]}" if log else ""))
        time.sleep(0.05)


def is_worker(pid: int) -> bool:
    """pid is (still) one of our worker processes, not a process that reused the number."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"server.cli" in cmdline and b"worker" in cmdline


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> Iterator[Service]:
    with start_service(tmp_path_factory.mktemp("personalization")) as service:
        yield service


@contextlib.contextmanager
def start_service(tmp: Path, chat_template: bool = False) -> Iterator[Service]:
    """serve (one worker) on a tiny Llama whose byte tokenizer has a chat template if asked."""
    model_dir = tmp / "tiny-llama"
    make_tiny_llama().save_pretrained(model_dir)
    make_byte_tokenizer(chat_template).save_pretrained(model_dir)
    redis = RedisServer().start()
    port = free_port()
    # One thread each: the server and its worker share the test machine's few cores.
    # The worker trains in float32 as the tiny model is served (bfloat16, the default where
    # the CPU has it, pays off on real model sizes only).
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PREFIX_SERVE_")}, "OMP_NUM_THREADS": "1",
           "PREFIX_SERVE_TRAIN_DTYPE": "float32"}
    args = [sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir), "--redis-url", redis.url,
            "--port", str(port), "--admin-key", ADMIN_KEY, "--workers", "1", "--dtype", "float32",
            "--device", "cpu", "--kv-cache-bytes", str(4 << 20), "--cache-dir", str(tmp / "cache"),
            "--job-claim-timeout-s", str(CLAIM_TIMEOUT_S), "--log-level", "warning"]
    for flag, value in LIMITS.items():
        args += [flag, str(value)]
    log_path = tmp / "serve.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    service = Service(f"http://127.0.0.1:{port}", proc, log_path, redis, model_dir)
    try:
        def ready() -> bool:
            assert proc.poll() is None, f"serve exited with {proc.returncode}:\n{service.log()}"
            try:
                return httpx.get(f"{service.url}/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, START_BOUND_S, "the server to be ready", service)
        yield service
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for pid in service.worker_pids():  # serve stops its workers; make sure of it
            if is_worker(pid):
                os.kill(pid, signal.SIGKILL)
        redis.close()
