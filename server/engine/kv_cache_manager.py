"""The one owner of the paged KV pool's blocks: every request's own segment and every
resident prefix's shared segment (vLLM v1's KVCacheManager plays this part).

    pool: [num_blocks] blocks of block_size slots, all layers at once
      ├─ resident prefixes (device_prefixes.py): read-only blocks shared by their users
      └─ each running request's own segment: its prompt and output tokens, in order

# NOTE: the scheduler asks this class for blocks and never touches the pool itself.
# Allocation is all or nothing and evicts unused prefixes (LRU) before it gives up; what
# to do when it gives up (wait, or preempt a request) is the scheduler's decision.
"""

from __future__ import annotations

from typing import Callable

import torch

from server.engine.block_pool import BlockPool, blocks_for
from server.engine.device_prefixes import DevicePrefixes
from server.engine.request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int,
                 write_prefix: Callable[[list[int], torch.Tensor], None],
                 copy_block: Callable[[int, int], None] | None = None) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.prefixes = DevicePrefixes(self.pool, block_size, write_prefix)
        self._copy_block = copy_block

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free(self) -> int:
        return self.pool.num_free

    @property
    def num_available(self) -> int:
        """Blocks free now or once unused prefixes are evicted."""
        return self.pool.num_free + self.prefixes.evictable_blocks()

    def blocks_to_start(self, req: Request, num_tokens: int) -> int:
        """Of the available blocks, how many starting req with `num_tokens` own slots takes:
        its own, plus its prefix's unless a running request already holds them."""
        own = blocks_for(num_tokens, self.block_size)
        if req.prefix is None:
            return own
        entry = self.prefixes.get(req.prefix.key)
        if entry is None:
            return own + blocks_for(req.prefix.length, self.block_size)
        return own + (len(entry.blocks) if entry.users == 0 else 0)

    def blocks_needed(self, prefix_len: int, num_tokens: int) -> int:
        """Blocks a request holds at most: its prefix's and its own `num_tokens`."""
        return blocks_for(prefix_len, self.block_size) + blocks_for(num_tokens, self.block_size)

    def acquire_prefix(self, req: Request) -> bool:
        """Make req's prefix resident (if it has one) and count req as its user. False, with
        nothing taken, if the pool has no room for it."""
        if req.prefix is None:
            return True
        entry = self.prefixes.acquire(req.prefix)
        if entry is None:
            return False
        req.prefix_blocks = entry.blocks
        return True

    def allocate(self, req: Request, num_tokens: int) -> bool:
        """Grow req's own segment to hold `num_tokens` slots, evicting unused prefixes if
        needed. False, with nothing taken, if there is not room even then."""
        need = blocks_for(num_tokens, self.block_size) - len(req.own_blocks)
        if need <= 0:
            return True
        if not self.prefixes.evict_until_free(need):
            return False
        blocks = self.pool.allocate(need)
        assert blocks is not None
        req.own_blocks += blocks
        return True

    def fork(self, parent: Request, child: Request, num_tokens: int) -> bool:
        """Give `child` the parent's first `num_tokens` own slots (computed): the full blocks
        shared (never written again: both write past them), the partial last block copied.
        Also counts child as a user of the prefix. False, with nothing taken, if the pool
        has no block for the copy."""
        if not self.acquire_prefix(child):
            return False
        full, partial = divmod(num_tokens, self.block_size)
        copy: list[int] = []
        if partial:
            if not self.prefixes.evict_until_free(1):
                self.free(child)
                return False
            copy = self.pool.allocate(1)
            self._copy_block(parent.own_blocks[full], copy[0])
        shared = parent.own_blocks[:full]
        self.pool.share(shared)
        child.own_blocks = shared + copy
        return True

    def free(self, req: Request) -> None:
        """Give back everything req holds: its own blocks, and its use of its prefix."""
        self.pool.free(req.own_blocks)
        req.own_blocks = []
        if req.prefix is not None and req.prefix_blocks:
            self.prefixes.release(req.prefix.key)
        req.prefix_blocks = []
