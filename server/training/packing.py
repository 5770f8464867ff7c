"""Packing token sequences into a few rows, each shared beginning computed once.

A training step runs many sequences that often start alike: the chat template's system
turn, or one E2E table prompt with several reference sentences. Padding every sequence to
the longest one, and running each copy of a shared prompt again, is work thrown away.

    sequences  [a b c x y]  [a b c z]  [a b q]        (token ids)
    packed row  a b c x y z q                           one token per node of their trie
    positions   0 1 2 3 4 3 2                           depth in the trie = position in its sequence
    sees        each token sees its ancestors and itself (and, at forward time, every prefix slot)

Each node's output is exactly the output of that token in each sequence that contains it:
a token attends to the same tokens at the same positions as in its own sequence, so the
logits (and the loss, and its gradient) equal those of the padded batch. Sequences sorted
by their tokens fill rows greedily up to `row_tokens` nodes (a sequence longer than that
gets a row of its own); rows are right-padded, and a pad sees nothing in the row (at
forward time it still sees the prefix, so no attention row is empty).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedRows:
    input_ids: torch.Tensor  # [R, T] token ids, 0 for pads
    positions: torch.Tensor  # [R, T] position of each token in its sequence(s) (the prefix length is added later)
    visible: torch.Tensor  # [R, T, T] bool: token i sees token j (j is i or an ancestor of i)
    index: list[list[int]]  # for each input sequence, the flat index r * T + t of each of its tokens
    num_tokens: int  # tokens computed, pads excluded (the sequences hold more when they share beginnings)


def pack(sequences: list[list[int]] | list[tuple[int, ...]], row_tokens: int = 512) -> PackedRows:
    """Pack sequences (token ids, each non-empty) into rows; see the module docstring."""
    if not sequences:
        raise ValueError("nothing to pack")
    if any(len(s) == 0 for s in sequences):
        raise ValueError("cannot pack an empty sequence")
    order = sorted(range(len(sequences)), key=lambda i: tuple(sequences[i]))
    rows: list[_Row] = []
    row = _Row()
    for i in order:
        seq = sequences[i]
        if row.nodes and row.size_with(seq) > row_tokens:
            rows.append(row)
            row = _Row()
        row.add(i, seq)
    rows.append(row)

    width = max(len(r.tokens) for r in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    visible = torch.zeros(len(rows), width, width, dtype=torch.bool)
    index: list[list[int]] = [[] for _ in sequences]
    for r, row in enumerate(rows):
        n = len(row.tokens)
        input_ids[r, :n] = torch.tensor(row.tokens)
        positions[r, :n] = torch.tensor(row.depths)
        for node, parent in enumerate(row.parents):
            if parent >= 0:
                visible[r, node] = visible[r, parent]  # a parent comes before its children
            visible[r, node, node] = True
        for i, nodes in row.members.items():
            index[i] = [r * width + node for node in nodes]
    return PackedRows(input_ids=input_ids, positions=positions, visible=visible, index=index,
                      num_tokens=sum(len(r.tokens) for r in rows))


class _Row:
    """One row's trie: node n has token tokens[n], parent parents[n] (-1: a root), depth depths[n]."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.depths: list[int] = []
        self.children: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
        self.members: dict[int, list[int]] = {}  # sequence index -> its nodes, in order

    @property
    def nodes(self) -> int:
        return len(self.tokens)

    def size_with(self, seq) -> int:
        """Nodes of this row once `seq` is added."""
        parent, shared = -1, 0
        for token in seq:
            node = self.children.get((parent, token))
            if node is None:
                break
            parent, shared = node, shared + 1
        return self.nodes + len(seq) - shared

    def add(self, i: int, seq) -> None:
        parent, path = -1, []
        for depth, token in enumerate(seq):
            node = self.children.get((parent, token))
            if node is None:
                node = len(self.tokens)
                self.tokens.append(int(token))
                self.parents.append(parent)
                self.depths.append(depth)
                self.children[(parent, token)] = node
            path.append(node)
            parent = node
        self.members[i] = path
