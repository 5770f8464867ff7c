"""The tensor versions this process has already checked, so that reading the same version
again skips the sha256 of its bytes (737 KB for a SmolLM2-135M prefix of 16 tokens in
float32: the host LRU evicts it, the next request reads it again).

NOTE: what skipping assumes, and what is still checked on every read.
- The bytes under a tensor key never change while the key exists: the key's name carries
  the version (a serving copy's version is in the record), the store writes a key only with
  bytes that hash to that version, and writing the same version again writes the same
  bytes. So bytes that hashed right once hash right again, unless something other than
  PrefixStore wrote the key, or Redis lost the data and something rewrote it, or memory or
  disk corrupted it.
- Each entry remembers the length of the bytes it checked; a read of another length (a
  truncated or different tensor) is hashed again. That costs nothing.
- The resolver forgets every entry when the store's event subscription reconnects (Redis
  restarted, failed over, or was unreachable), so bytes reloaded from disk after a restart
  are hashed again once.
- Not caught: bytes changed in place to others of the same length while this process stays
  connected. The check guards against corruption and bugs, not against someone with write
  access to Redis, who could rewrite the records (and so the versions) as well.
"""

from __future__ import annotations

import threading
from collections import OrderedDict


class VerifiedVersions:
    """A bounded LRU of (key, version, length) whose bytes hashed to the version; thread-safe
    (prefix loads run on several threads)."""

    def __init__(self, capacity: int = 65536) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[tuple[str, str, int], None] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def contains(self, key: str, version: str, length: int) -> bool:
        with self._lock:
            entry = (key, version, length)
            if entry not in self._entries:
                return False
            self._entries.move_to_end(entry)
            return True

    def add(self, key: str, version: str, length: int) -> None:
        with self._lock:
            self._entries[(key, version, length)] = None
            self._entries.move_to_end((key, version, length))
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
