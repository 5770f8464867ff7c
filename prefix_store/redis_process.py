"""A redis-server child process that we start, own and stop (tests, and `serve`'s embedded mode).

It listens on loopback only with protected mode on; a data directory holds its log, its
pid file and, with `appendonly=True`, its append-only file so that prefixes survive a
restart. The append-only file is fsynced before every reply (`appendfsync always`): a write
that Redis acknowledged (an upload, a tenant, a job's state) survives a crash of Redis or of
the machine. A redis-server left running on the same data directory by an owner that was
killed is stopped before a new one starts, so two never write one append-only file.
`keep_running()` restarts it (same port, same data) whenever it exits, until `stop()`.
"""

from __future__ import annotations

import os
import shutil
import signal
import logging
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import redis

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class RedisServer:
    """Usage: `with RedisServer() as r: PrefixStore(r.url)`; `stop()`/`start()` keep port and data."""

    HOST = "127.0.0.1"  # never anything but loopback: the server has no password

    def __init__(self, port: int | None = None, datadir: str | Path | None = None,
                 appendonly: bool = False, executable: str = "redis-server",
                 start_timeout: float = 10.0):
        self.port = port if port is not None else free_port(self.HOST)
        # a port chosen here may be taken by another socket before redis binds it: until the
        # first start succeeds (nobody has the url yet), such a start tries a new port
        self._may_move = port is None
        self._owns_datadir = datadir is None
        self.datadir = Path(datadir) if datadir is not None else Path(tempfile.mkdtemp(prefix="prefix-serve-redis-"))
        self.appendonly = appendonly
        self.executable = executable
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen | None = None
        self._lock = threading.RLock()  # start/stop against the keep_running thread
        self._stop_watching = threading.Event()
        self._watcher: threading.Thread | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"redis://{self.HOST}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.datadir / "redis.log"

    @property
    def pid_path(self) -> Path:
        return self.datadir / "redis.pid"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        exe = shutil.which(self.executable)
        if exe is None:
            raise FileNotFoundError(f"{self.executable!r} not found on PATH; install redis-server "
                                    "or pass --redis-url to use a running Redis")
        return [
            exe, "--port", str(self.port), "--bind", self.HOST, "--protected-mode", "yes",
            "--dir", str(self.datadir), "--logfile", str(self.log_path), "--daemonize", "no",
            "--save", "",  # no RDB snapshots: the append-only file (if on) is the durability
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",  # on disk before the reply (writes here are few: uploads, jobs)
            "--pidfile", str(self.pid_path),
            # a prefix whose tensor was evicted would be metadata without its tensor
            "--maxmemory-policy", "noeviction",
        ]

    def keep_running(self, poll_s: float = 0.5) -> "RedisServer":
        """Start redis-server again whenever it exits (killed, crashed), until stop()."""
        def watch() -> None:
            delay = poll_s
            while not self._stop_watching.wait(delay):
                with self._lock:
                    if self._stop_watching.is_set() or self.running:
                        delay = poll_s
                        continue
                    code = self._proc.returncode if self._proc is not None else None
                    log.warning("redis-server on port %d exited (code %s); starting it again", self.port, code)
                    try:
                        self.start()
                        self.restarts += 1
                        delay = poll_s
                    except (RuntimeError, OSError) as e:
                        log.error("could not restart redis-server: %s", e)
                        delay = min(10.0, 2 * delay)

        self._stop_watching.clear()
        self._watcher = threading.Thread(target=watch, name=f"redis-{self.port}-watch", daemon=True)
        self._watcher.start()
        return self

    def start(self) -> "RedisServer":
        with self._lock:
            for attempt in range(3):
                try:
                    self._start()
                    break
                except RuntimeError as e:
                    if not self._may_move or attempt == 2 or "Address already in use" not in str(e):
                        raise
                    self.port = free_port(self.HOST)
            self._may_move = False
            return self

    def _start(self) -> "RedisServer":
        if self.running:
            return self
        self.datadir.mkdir(parents=True, exist_ok=True)
        self._stop_leftover()
        self._proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, start_new_session=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + self.start_timeout
        client = redis.Redis(host=self.HOST, port=self.port, socket_timeout=1, socket_connect_timeout=1)
        try:
            while True:
                if self._proc.poll() is not None:
                    err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                    code = self._proc.returncode
                    self._proc = None
                    raise RuntimeError(f"redis-server on port {self.port} exited with code {code} "
                                       f"while starting. {err.strip()}\n{self._log_tail()}".strip())
                try:
                    # the pid check: another server on this port must not pass for ours
                    if client.info("server").get("process_id") == self._proc.pid and client.ping():
                        return self
                except (redis.ConnectionError, redis.TimeoutError):
                    pass  # not listening yet (or still loading the append-only file)
                if time.monotonic() > deadline:
                    self._stop()
                    raise RuntimeError(f"redis-server on port {self.port} did not answer PING within "
                                       f"{self.start_timeout:.0f} s. {self._log_tail()}")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Redis then flushes its append-only file), SIGKILL after `timeout` s."""
        self._stop_watching.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join()
            self._watcher = None
        with self._lock:
            self._stop()

    def _stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr:
            proc.stderr.close()

    def _stop_leftover(self, timeout: float = 30.0) -> None:
        """Stop a redis-server that still runs on our data directory (its owner was killed)."""
        try:
            pid = int(self.pid_path.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            cwd = Path(f"/proc/{pid}/cwd").resolve()  # redis-server chdirs into --dir
        except (OSError, ValueError):
            return  # no pid file, no such process, or no /proc to ask
        if b"redis-server" not in cmdline or cwd != self.datadir.resolve():
            return  # the pid was reused by another process
        os.kill(pid, signal.SIGTERM)  # Redis flushes its append-only file and exits
        deadline = time.monotonic() + timeout
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        """Stop, and remove the data directory if this object created it."""
        self.stop()
        if self._owns_datadir:
            shutil.rmtree(self.datadir, ignore_errors=True)

    def _log_tail(self, lines: int = 10) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "log tail:\n" + "\n".join(tail)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
