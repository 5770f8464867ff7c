"""docker/haproxy/haproxy.cfg run by a real HAProxy on loopback, with the compose service
addresses swapped for local replicas (everything else, the routing rules included, as
shipped)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from prefix_store.redis_process import free_port
from tests.processes import START_BOUND_S, log_tail, stop_process

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "docker" / "haproxy" / "haproxy.cfg"


def local_config(replicas: dict[str, int], port: int) -> str:
    """The shipped config with `server <name> <name>:8000` -> 127.0.0.1:<port of name>, the
    frontend on 127.0.0.1:<port>, and Docker's DNS resolver left out."""
    text = CONFIG.read_text()
    text = re.sub(r"^resolvers docker\n(?:[ \t]+.*\n)*", "", text, flags=re.M)
    text = text.replace(" resolvers docker init-addr last,libc,none", "")
    text = re.sub(r"^(\s*)bind :\d+", rf"\1bind 127.0.0.1:{port}", text, flags=re.M)
    for name, replica_port in replicas.items():
        text, n = re.subn(rf"^(\s*server {re.escape(name)}) \S+$", rf"\1 127.0.0.1:{replica_port}", text, flags=re.M)
        assert n == 1, f"no `server {name}` line in {CONFIG}"
    return text


class HAProxy:
    def __init__(self, replicas: dict[str, int]) -> None:
        self.exe = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
        if self.exe is None:
            raise FileNotFoundError("haproxy is not installed")
        self.dir = Path(tempfile.mkdtemp(prefix="prefix-serve-haproxy-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (self.dir / "haproxy.cfg").write_text(local_config(replicas, self.port))
        self._proc: subprocess.Popen | None = None

    def start(self, timeout: float = START_BOUND_S) -> "HAProxy":
        log = open(self.dir / "haproxy.log", "wb")
        # -db: stay in the foreground
        self._proc = subprocess.Popen([self.exe, "-db", "-f", str(self.dir / "haproxy.cfg")],
                                      stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self._proc.returncode}: {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"haproxy did not answer /health within {timeout:.0f} s: {self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self, n: int = 20) -> str:
        return log_tail(self.dir / "haproxy.log", n)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        stop_process(proc, 10)
        shutil.rmtree(self.dir, ignore_errors=True)
