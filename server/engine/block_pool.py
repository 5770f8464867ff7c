"""The KV pool's allocator: fixed-size blocks handed out all-or-nothing, with a reference
count per block.

# NOTE: a block is either free (in `_free`, count 0) or held by one or more holders: a
# request's own segment, or a resident prefix. A request's full blocks may be held by
# several requests at once after a fork (the n samples of one prompt share the prompt's
# blocks: `share` counts each extra holder); a block is written only while it has one
# holder. Sharing a prefix's blocks between requests is counted by the prefix cache, not
# here. Freeing a block more often than it was held is a bug and raises instead of
# corrupting the free list.
"""

from __future__ import annotations

from collections import deque


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """n blocks, lowest-recently-freed first; None (and nothing taken) if fewer are free."""
        if n > len(self._free):
            return None
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._refs[b] = 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        """One more holder of each of `blocks` (held already)."""
        for b in blocks:
            if self._refs[b] == 0:
                raise RuntimeError(f"block {b} is free: it cannot be shared")
            self._refs[b] += 1

    def free(self, blocks: list[int]) -> None:
        """One holder fewer of each block; a block nobody holds goes back to the free list."""
        for b in blocks:
            if self._refs[b] == 0:
                raise RuntimeError(f"block {b} freed twice")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks that hold `num_tokens` slots."""
    return -(-num_tokens // block_size)
