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
    # Filled lazily by a kernel that wants a per-step plan shared by all layers.
    plan: object | None = None

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
        cu = [0]
        for q in q_lens:
            cu.append(cu[-1] + q)
        slots: list[int] = []
        for q, n, blocks in zip(q_lens, seq_lens, own_blocks):
            if q > n:
                raise ValueError(f"a request schedules {q} new tokens but its own segment holds {n}")
            for pos in range(n - q, n):
                slots.append(blocks[pos // block_size] * block_size + pos % block_size)

        def table(rows: list[list[int]]) -> torch.Tensor:
            width = max([len(r) for r in rows] + [1])
            return torch.tensor([r + [0] * (width - len(r)) for r in rows] or [[0]], dtype=torch.int32)

        return AttentionMetadata(
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
            prefix_lens=torch.tensor(prefix_lens, dtype=torch.int32, device=device),
            prefix_block_tables=table(prefix_blocks).to(device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=table(own_blocks).to(device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_size=block_size,
            q_lens_host=list(q_lens),
            prefix_lens_host=list(prefix_lens),
            seq_lens_host=list(seq_lens),
            prefix_blocks_host=[list(r) for r in prefix_blocks],
            own_blocks_host=[list(r) for r in own_blocks],
        )
