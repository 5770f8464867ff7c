"""The MLP reparameterization of a prefix used while training (Li & Liang 2021, §4.3).

    kv = MLP(E)    E: Embedding(P, d)  ->  Linear(d, mid)  ->  Tanh  ->  Linear(mid, L*2*Hkv*hd)

Optimising E and the MLP instead of kv directly is what makes prefix-tuning stable; after
training only the output kv is kept (as PEFT does at save time).

Initialisation from real words. The paper starts a prefix at the activations of real
words. `fit_output(target)` makes the MLP's output equal `target` exactly at step 0, in
closed form: with H = tanh(E W1 + b1) ([P, mid], rank P for a random E when P <= mid), set
b2 = mean of the target rows and W2 = the least-squares (minimum-norm) solution of
H W2^T = target - b2. E and W1 keep their random init, so every parameter still gets
gradients; W2 is the smallest weight that reproduces the target. This needs P <= mid,
which TrainConfig checks.
"""

from __future__ import annotations

import torch
from torch import nn


class PrefixMLP(nn.Module):
    def __init__(self, prefix_len: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 embed_dim: int, mid_dim: int) -> None:
        super().__init__()
        self.shape = (prefix_len, num_layers, 2, num_kv_heads, head_dim)
        self.embedding = nn.Embedding(prefix_len, embed_dim)
        self.transform = nn.Sequential(
            nn.Linear(embed_dim, mid_dim),
            nn.Tanh(),
            nn.Linear(mid_dim, num_layers * 2 * num_kv_heads * head_dim),
        )

    def hidden(self) -> torch.Tensor:
        """tanh(E W1 + b1): [P, mid]."""
        return self.transform[1](self.transform[0](self.embedding.weight))

    def forward(self) -> torch.Tensor:
        """The prefix kv [L, 2, Hkv, P, hd] (float32)."""
        flat = self.transform[2](self.hidden())  # [P, L*2*Hkv*hd], PEFT's layout
        return flat.view(self.shape).permute(1, 2, 3, 0, 4)

    @torch.no_grad()
    def fit_output(self, target: torch.Tensor) -> None:
        """Set the last layer so that forward() == target ([L, 2, Hkv, P, hd]) exactly."""
        p = self.shape[0]
        if tuple(target.shape) != (self.shape[1], 2, self.shape[3], p, self.shape[4]):
            raise ValueError(f"init kv has shape {tuple(target.shape)}; the prefix needs "
                             f"{(self.shape[1], 2, self.shape[3], p, self.shape[4])}")
        last = self.transform[2]
        if p > last.in_features:
            raise ValueError(f"cannot fit {p} virtual tokens through mid_dim {last.in_features}; "
                             f"num_virtual_tokens must be <= mid_dim")
        flat = target.permute(3, 0, 1, 2, 4).reshape(p, -1).double()  # [P, L*2*Hkv*hd]
        hidden = self.hidden().double()  # [P, mid]
        bias = flat.mean(dim=0)
        # Minimum-norm solution of hidden @ W^T = flat - bias, in float64 for exactness.
        weight_t = torch.linalg.pinv(hidden) @ (flat - bias)  # [mid, L*2*Hkv*hd]
        last.weight.copy_(weight_t.T.to(last.weight.dtype))
        last.bias.copy_(bias.to(last.bias.dtype))
