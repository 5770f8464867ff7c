"""The device tier of prefix residency: each resident prefix owns read-only blocks in the pool.

# NOTE: invariants
# - A resident prefix is keyed by its refs (tenant, id, version) of every part, so a
#   re-upload under the same id is a different key and never serves the old tensor.
# - `users` counts the running requests that read its blocks. Only prefixes with
#   users == 0 are evicted, least recently used first; a prefix in use never is.
# - Blocks are written once, when the prefix becomes resident, and never change after.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

from server.engine.block_pool import BlockPool, blocks_for
from server.prefix import Prefix


@dataclass
class ResidentPrefix:
    key: tuple
    blocks: list[int]
    length: int  # prefix_len P
    nbytes: int  # bytes of the host tensor it came from
    users: int = 0


class DevicePrefixes:
    def __init__(self, pool: BlockPool, block_size: int,
                 write: Callable[[list[int], torch.Tensor], None]) -> None:
        self.pool = pool
        self.block_size = block_size
        self._write = write  # copies kv [L, 2, Hkv, P, hd] into the given blocks
        self._entries: OrderedDict[tuple, ResidentPrefix] = OrderedDict()  # LRU first
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: tuple) -> bool:
        return key in self._entries

    def get(self, key: tuple) -> ResidentPrefix | None:
        return self._entries.get(key)

    @property
    def num_blocks(self) -> int:
        return sum(len(e.blocks) for e in self._entries.values())

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def lru_keys(self) -> list[tuple]:
        """Resident keys, least recently used first (for tests and metrics)."""
        return list(self._entries)

    def acquire(self, prefix: Prefix) -> ResidentPrefix | None:
        """Make `prefix` resident and count one more user; None if the pool has no room."""
        entry = self._entries.get(prefix.key)
        if entry is not None:
            self.hits += 1
        else:
            need = blocks_for(prefix.length, self.block_size)
            if not self.evict_until_free(need):
                return None
            blocks = self.pool.allocate(need)
            assert blocks is not None
            self._write(blocks, prefix.kv)
            entry = ResidentPrefix(prefix.key, blocks, prefix.length, prefix.nbytes)
            self._entries[prefix.key] = entry
            self.misses += 1
        entry.users += 1
        self._entries.move_to_end(prefix.key)
        return entry

    def release(self, key: tuple) -> None:
        entry = self._entries[key]
        if entry.users <= 0:
            raise RuntimeError(f"prefix {key} released more often than acquired")
        entry.users -= 1

    def evictable_blocks(self) -> int:
        return sum(len(e.blocks) for e in self._entries.values() if e.users == 0)

    def evict_until_free(self, num_blocks: int) -> bool:
        """Evict unused prefixes (LRU first) until the pool has `num_blocks` free. All or
        nothing: False, evicting nothing, if even evicting every unused one is not enough."""
        if self.pool.num_free >= num_blocks:
            return True
        if self.pool.num_free + self.evictable_blocks() < num_blocks:
            return False
        for key in [k for k, e in self._entries.items() if e.users == 0]:
            if self.pool.num_free >= num_blocks:
                break
            self.pool.free(self._entries.pop(key).blocks)
            self.evictions += 1
        return True

    def drop_stale(self, tenant: str, prefix_id: str, keep_version: str | None) -> int:
        """Evict unused prefixes holding another version of (tenant, prefix_id)."""
        stale = [k for k, e in self._entries.items() if e.users == 0 and any(
            getattr(r, "tenant", None) == tenant and getattr(r, "prefix_id", None) == prefix_id
            and r.version != keep_version for r in k)]
        return sum(self.drop(k) for k in stale)

    def drop(self, key: tuple) -> bool:
        """Evict one prefix now if nobody uses it (a store event said it is stale)."""
        entry = self._entries.get(key)
        if entry is None or entry.users > 0:
            return False
        self.pool.free(self._entries.pop(key).blocks)
        self.evictions += 1
        return True
