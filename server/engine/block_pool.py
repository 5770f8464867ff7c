"""The KV pool's allocator: fixed-size blocks handed out all-or-nothing.

# NOTE: a block is either free (in `_free`) or owned by exactly one holder: a request's
# own segment or a resident prefix. Sharing a prefix's blocks between requests is counted
# by the prefix cache, not here, so `free` of a block that is already free is a bug and
# raises instead of corrupting the free list.
"""

from __future__ import annotations

from collections import deque


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._is_free = [True] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """n blocks, lowest-recently-freed first; None (and nothing taken) if fewer are free."""
        if n > len(self._free):
            return None
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._is_free[b] = False
        return blocks

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if self._is_free[b]:
                raise RuntimeError(f"block {b} freed twice")
            self._is_free[b] = True
            self._free.append(b)


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks that hold `num_tokens` slots."""
    return -(-num_tokens // block_size)
