"""Small helpers for the prefix store tests."""

from __future__ import annotations

import queue
import time
import uuid
from collections.abc import Callable

import redis
import torch

FINGERPRINT = "tiny-llama-test"


def make_kv(seed: int, dtype: torch.dtype = torch.float32, plen: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 2, 2, plen, 8, generator=g).to(dtype)  # [L, 2, Hkv, P, hd]


def unique_namespace() -> str:
    return "t" + uuid.uuid4().hex[:12]


def namespace_keys(client: redis.Redis, namespace: str) -> list[bytes]:
    return sorted(client.scan_iter(match=f"{namespace}:*", count=1000))


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Bounded wait for something asynchronous (never a timing assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def drain(q: queue.Queue, n: int, timeout: float = 10.0) -> list:
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        try:
            out.append(q.get(timeout=max(0.0, deadline - time.monotonic())))
        except queue.Empty:
            break
    return out
