"""The host-memory tier of prefix residency: an LRU of checked Prefix objects, in the
engine's dtype, within a byte budget.

    device (prefix blocks in the KV pool: server/engine/device_prefixes.py)
      <- host memory (this LRU)
        <- Redis (prefix_store)

# NOTE: invariants
# - Entries are keyed by the refs (tenant, id, version) of every part, so a re-upload under
#   the same id is a different key: the old tensor can never be served for the new version.
# - It also remembers the version last seen in the store for each id, so that while the
#   store is unreachable the resolver can serve a warm prefix (and only that version).
# - Thread-safe: store events arrive on the subscription's thread.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from server.prefix import Prefix, PrefixRef


class HostPrefixes:
    """LRU of Prefix objects within a byte budget; thread-safe (store events arrive on a thread)."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[tuple[PrefixRef, ...], Prefix] = OrderedDict()  # LRU first
        # (tenant, id) -> (version last seen in the store, whether it was marked shared)
        self._latest: dict[tuple[str, str], tuple[str, bool]] = {}
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[PrefixRef, ...]) -> Prefix | None:
        with self._lock:
            prefix = self._entries.get(key)
            if prefix is None:
                self.misses += 1
                return None
            self.hits += 1
            self._entries.move_to_end(key)
            return prefix

    def put(self, prefix: Prefix) -> None:
        """Keep `prefix` (a prefix larger than the whole budget is simply not kept)."""
        key = prefix.key
        with self._lock:
            if key in self._entries or prefix.nbytes > self.capacity_bytes:
                return
            self._entries[key] = prefix
            self.nbytes += prefix.nbytes
            while self.nbytes > self.capacity_bytes:
                _, old = self._entries.popitem(last=False)
                self.nbytes -= old.nbytes
                self.evictions += 1

    def note_version(self, ref: PrefixRef, shared: bool = False) -> None:
        with self._lock:
            self._latest[(ref.tenant, ref.prefix_id)] = (ref.version, shared)

    def latest_resident(self, tenant: str, prefix_id: str, shared_only: bool = False) -> Prefix | None:
        """The resident copy of the version last seen in the store, for when the store is
        down (with `shared_only`, only if that version was marked shared)."""
        with self._lock:
            latest = self._latest.get((tenant, prefix_id))
            if latest is None or (shared_only and not latest[1]):
                return None
            return self._entries.get((PrefixRef(tenant, prefix_id, latest[0]),))

    def drop_stale(self, tenant: str, prefix_id: str, keep_version: str | None) -> int:
        """Drop every entry that uses (tenant, id) in a version other than keep_version."""
        with self._lock:
            if keep_version is None or self._latest.get((tenant, prefix_id), ("",))[0] != keep_version:
                # a new version: whether it is shared is learnt at its next resolve
                self._latest.pop((tenant, prefix_id), None)
            stale = [k for k in self._entries
                     if any(r.tenant == tenant and r.prefix_id == prefix_id and r.version != keep_version
                            for r in k)]
            for key in stale:
                self.nbytes -= self._entries.pop(key).nbytes
            return len(stale)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._latest.clear()
            self.nbytes = 0
