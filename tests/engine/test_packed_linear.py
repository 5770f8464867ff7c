"""PackedLinear, the fused projection of the CPU forward: the same y = x W^T + b as the HF
Linears it fuses, pre-packed for oneDNN only where this CPU computes bf16 there."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server.engine.models.packed_linear import PackedLinear, onednn_bf16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_a_fused_projection_computes_its_linears_side_by_side(dtype, bias):
    torch.manual_seed(0)
    linears = [torch.nn.Linear(48, n, bias=bias).to(dtype) for n in (32, 16, 16)]  # q, k, v
    fused = PackedLinear(linears)
    # packed only for bf16 where oneDNN has the path; an AVX2-only CPU raised here before
    assert (fused.packed is not None) == (dtype == torch.bfloat16 and onednn_bf16())
    for tokens in (1, 7, 64):
        x = torch.randn(tokens, 48).to(dtype)
        expected = torch.cat([F.linear(x, m.weight, m.bias) for m in linears], dim=1)
        tol = 0 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(fused(x), expected, atol=tol, rtol=tol)
