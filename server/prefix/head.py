"""ClassifierHead: the linear head a SEQ_CLS prefix adapter brings (PEFT's modules_to_save).

A classification prefix is a prefix plus, when it was trained with one, its own head: the
store keeps both in one tensor file (one content hash), so a version always names one
prefix and one head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class ClassifierHead:
    """A linear classifier head: logits = pooled @ weight.T + bias."""

    weight: torch.Tensor  # [num_labels, hidden]
    bias: torch.Tensor  # [num_labels]
    labels: tuple[str, ...] | None = None  # names by index

    @property
    def num_labels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size() + self.bias.numel() * self.bias.element_size()

    def on_host(self) -> "ClassifierHead":
        """A contiguous float32 host copy (the head is applied in float32)."""
        return ClassifierHead(self.weight.detach().to("cpu", torch.float32).contiguous(),
                              self.bias.detach().to("cpu", torch.float32).contiguous(), self.labels)
