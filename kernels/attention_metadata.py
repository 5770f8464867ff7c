"""What an attention kernel needs to know about one packed, varlen step.

A step packs the new tokens of B requests into one sequence of T tokens. Request b owns
tokens cu_seqlens_q[b]:cu_seqlens_q[b+1]. Its keys and values live in a paged pool in two
segments, each with its own block table and length:

    prefix segment: prefix_block_tables[b], prefix_lens[b] slots   (shared, read-only)
    own segment:    block_tables[b],        seq_lens[b] slots      (includes this step's tokens)

Slot s of a segment lives at pool row block_table[s // block_size] * block_size + s % block_size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    cu_seqlens_q: torch.Tensor  # [B + 1] int32, on the compute device
    prefix_lens: torch.Tensor  # [B] int32
    prefix_block_tables: torch.Tensor  # [B, max_prefix_blocks] int32, padded with 0
    seq_lens: torch.Tensor  # [B] int32: own tokens in the pool after this step's writes
    block_tables: torch.Tensor  # [B, max_own_blocks] int32, padded with 0
    slot_mapping: torch.Tensor  # [T] int64: pool row that each new token's k/v is written to
    block_size: int
    # Host copies of the per-request numbers, so CPU-side planning never syncs a device.
    q_lens_host: list[int] = field(default_factory=list)  # [B]
    prefix_lens_host: list[int] = field(default_factory=list)  # [B]
    seq_lens_host: list[int] = field(default_factory=list)  # [B]
    prefix_blocks_host: list[list[int]] = field(default_factory=list)  # [B][*]
    own_blocks_host: list[list[int]] = field(default_factory=list)  # [B][*]
    # Per-step plans of the kernels, built at the first layer and shared by all of them.
    plan: dict[str, object] = field(default_factory=dict)

    @staticmethod
    def build(
        q_lens: list[int],
        prefix_lens: list[int],
        prefix_blocks: list[list[int]],
        seq_lens: list[int],
        own_blocks: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> "AttentionMetadata":
        """Build from host lists; the new tokens are the last q_lens[b] of each own segment."""
        b = len(q_lens)
        assert len(prefix_lens) == len(prefix_blocks) == len(seq_lens) == len(own_blocks) == b
        q = torch.tensor(q_lens, dtype=torch.int64)  # [B]
        n = torch.tensor(seq_lens, dtype=torch.int64)
        if bool((q > n).any()):
            i = int(torch.nonzero(q > n)[0])
            raise ValueError(f"a request schedules {q_lens[i]} new tokens but its own segment holds {seq_lens[i]}")
        cu = torch.zeros(b + 1, dtype=torch.int64)
        torch.cumsum(q, 0, out=cu[1:])
        own_table = _table(own_blocks)  # [B, W] int64
        # slot of each new token: the last q_b positions of request b's own segment
        row = torch.repeat_interleave(torch.arange(b), q)  # [T] the request of each token
        pos = (n - q)[row] + torch.arange(int(cu[-1])) - cu[:-1][row]  # [T] its position in the segment
        slots = own_table[row, pos // block_size] * block_size + pos % block_size
        return AttentionMetadata(
            cu_seqlens_q=cu.to(device, torch.int32),
            prefix_lens=torch.tensor(prefix_lens, dtype=torch.int32, device=device),
            prefix_block_tables=_table(prefix_blocks).to(device, torch.int32),
            seq_lens=n.to(device, torch.int32),
            block_tables=own_table.to(device, torch.int32),
            slot_mapping=slots.to(device),
            block_size=block_size,
            q_lens_host=list(q_lens),
            prefix_lens_host=list(prefix_lens),
            seq_lens_host=list(seq_lens),
            prefix_blocks_host=prefix_blocks,
            own_blocks_host=own_blocks,
        )


def _table(rows: list[list[int]]) -> torch.Tensor:
    """[B, max len] int64, padded with 0 (at least one column)."""
    width = max([len(r) for r in rows] + [1])
    return torch.tensor([r + [0] * (width - len(r)) for r in rows] or [[0]], dtype=torch.int64)
