"""Small helpers for tests that run real helper processes (Prometheus, HAProxy, servers)."""

from __future__ import annotations

import subprocess
from pathlib import Path

# How long a test waits for a process it started to report itself ready before calling the
# start broken. Only a bound against a hang: nothing asserts on how long a start takes, and on
# a machine busy with other work (two replicas importing torch on two loaded cores) a start
# took over 120 s, which failed 17 tests of one run.
START_BOUND_S = 600.0


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def log_tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""
