"""Worker processes that `prefix-serve serve` starts next to the server, and restarts when they die.

Each is a plain `prefix-serve worker` child (its own process: training never shares the
serving process's interpreter or CPU time slices with the engine loop). A worker that dies
is started again after a short delay that grows while it keeps dying early (a broken
model path must not become a fork loop); its job is taken over through the queue. A worker
gets SIGTERM when serve dies, even by SIGKILL (Linux), so none trains on as an orphan.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time

log = logging.getLogger(__name__)

MIN_UPTIME_S = 30.0  # a worker that lived this long was healthy: restart it at once
MAX_DELAY_S = 60.0


class WorkerSupervisor:
    def __init__(self, worker_args: list[str], count: int = 1, poll_s: float = 0.5,
                 env: dict[str, str] | None = None):
        """`worker_args`: the flags after `prefix-serve worker`; `env`: the workers' environment
        (default: ours)."""
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self.command = [sys.executable, "-m", "server.cli", "worker", *worker_args]
        self.count = count
        self.env = dict(os.environ if env is None else env)
        self.poll_s = poll_s
        self.restarts = 0
        self._procs: list[subprocess.Popen | None] = [None] * count
        self._started_at = [0.0] * count
        self._delay = [0.0] * count
        self._next_start = [0.0] * count
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [p.pid for p in self._procs if p is not None and p.poll() is None]

    def start(self) -> "WorkerSupervisor":
        for index in range(self.count):
            self._spawn(index)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM every worker (each gives its running job back to the queue), SIGKILL after `timeout`."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()
        with self._lock:
            procs = [p for p in self._procs if p is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("training worker %d did not stop within %.0f s; killing it", proc.pid, timeout)
                proc.kill()
                proc.wait()

    def _spawn(self, index: int) -> None:
        proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, env=self.env, preexec_fn=_die_with_parent)
        with self._lock:
            self._procs[index] = proc
            self._started_at[index] = time.monotonic()
        print(f"prefix-serve: training worker {index + 1} started (pid {proc.pid})", flush=True)

    def _watch(self) -> None:
        while not self._stopping.wait(self.poll_s):
            for index in range(self.count):
                with self._lock:
                    proc = self._procs[index]
                if proc is not None and proc.poll() is not None:
                    lived = time.monotonic() - self._started_at[index]
                    self._delay[index] = 0.0 if lived >= MIN_UPTIME_S else min(MAX_DELAY_S, max(1.0, 2 * self._delay[index]))
                    self._next_start[index] = time.monotonic() + self._delay[index]
                    log.warning("training worker %d (pid %d) exited with code %s after %.0f s; restarting in %.0f s",
                                index + 1, proc.pid, proc.returncode, lived, self._delay[index])
                    with self._lock:
                        self._procs[index] = None
                    proc = None
                if proc is None and time.monotonic() >= self._next_start[index] and not self._stopping.is_set():
                    self.restarts += 1
                    self._spawn(index)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the thread that started us dies (Linux prctl
    PR_SET_PDEATHSIG; the supervisor's thread lives as long as serve). Elsewhere, nothing."""
    if sys.platform != "linux":
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass
