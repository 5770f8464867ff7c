"""y = x @ W^T + b for a projection fused from several HF Linears (q/k/v, or gate/up), with
W pre-packed once for oneDNN where that is faster.

On a CPU, in bfloat16, oneDNN's linear with a pre-packed weight skips re-laying out the
weight on every call and is 1.3-2x faster than F.linear at decode batch sizes, with the
same bits (measured on the development machine; tests compare the two). float32 and GPUs
use F.linear: the float32 parity tests stay on the exact path they always used. So does a
CPU without oneDNN's bf16 path (AVX2 only: no avx512bw/vl/dq nor avx_ne_convert), where
packing a bf16 weight raises.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BATCH_HINT = 64  # the batch size oneDNN lays the packed weight out for; any batch size works


def onednn_bf16() -> bool:
    """Whether oneDNN computes bf16 linears on this CPU (it refuses to pack for them otherwise)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class PackedLinear:
    def __init__(self, linears: list[torch.nn.Linear]) -> None:
        w = torch.cat([m.weight.detach() for m in linears], dim=0).contiguous()  # [sum(out), in]
        biases = [m.bias for m in linears]
        self.bias = None
        if any(b is not None for b in biases):
            self.bias = torch.cat([b.detach() if b is not None else w.new_zeros(m.weight.shape[0])
                                   for b, m in zip(biases, linears)]).contiguous()
        self.weight = w
        self.out_features = w.shape[0]
        self.packed = None
        if w.device.type == "cpu" and w.dtype == torch.bfloat16 and onednn_bf16():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w, BATCH_HINT)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in] -> [T, out]."""
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
