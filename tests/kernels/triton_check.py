"""Checks of the Triton prefix-attention kernel against the torch reference.

Run as a script (`TRITON_INTERPRET=1 python tests/kernels/triton_check.py`) it runs every
check in Triton's interpreter on CPU tensors and prints one JSON object: check id -> None
when the kernel matched, else the mismatch message. test_triton_attention.py starts it in
a subprocess because TRITON_INTERPRET only takes effect if it is set before triton is
first imported, and in a pytest session transformers has usually imported triton already.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from types import ModuleType

import torch

from attention_cases import CASES, Case, head_major, make_batch
from kernels import torch_attention
from kernels.attention_metadata import AttentionMetadata

NUM_KV_HEADS = 2
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@dataclass(frozen=True)
class Check:
    case: Case
    block_size: int
    group: int  # query heads per kv head
    dtype: torch.dtype
    head_dim: int = 16
    # 16 makes the longer segments take several key tiles (the online-softmax rescaling).
    block_n: int = 16
    head_major: bool = False  # the caches stored as the engine stores them

    @property
    def id(self) -> str:
        return (f"{self.case.name}-bs{self.block_size}-gqa{self.group}-{str(self.dtype).split('.')[1]}"
                f"-hd{self.head_dim}" + ("-head-major" if self.head_major else ""))


CHECKS = [Check(case, block_size, group, dtype)
          for case in CASES for block_size in (4, 16) for group in (1, 2, 4)
          for dtype in (torch.float32, torch.bfloat16)]
CHECKS += [
    Check(CASES[2], 4, 2, torch.float32, head_dim=32),
    Check(CASES[2], 4, 2, torch.float32, head_dim=24),  # padded to 32 with a mask
    Check(CASES[2], 4, 2, torch.float16),
    # A 70-token prefill chunk spans two 64-row query tiles: the second must still see the
    # first's keys, and the first must skip the key tiles past its last row.
    Check(Case("two_query_tiles", (70, 1), (5, 3), (75, 9)), 16, 2, torch.float32),
    Check(Case("empty_batch", (), (), ()), 4, 1, torch.float32),
]
CHECKS += [Check(case, 16, 2, dtype, head_major=True) for case in CASES for dtype in (torch.float32, torch.bfloat16)]


def run_check(kernel: ModuleType, check: Check, device: str = "cpu", block_n: int | None = None) -> str | None:
    """None when kernel.prefix_attention matches the torch reference, else why not."""
    batch = make_batch(check.case, check.block_size, NUM_KV_HEADS, check.group, check.head_dim, check.dtype)
    if check.head_major:
        batch = head_major(batch)
    scale = check.head_dim ** -0.5
    expected = torch_attention.prefix_attention(batch.q, batch.k_cache, batch.v_cache, batch.meta, scale)
    m = batch.meta
    meta = AttentionMetadata.build(m.q_lens_host, m.prefix_lens_host, m.prefix_blocks_host,
                                   m.seq_lens_host, m.own_blocks_host, m.block_size, device)
    q, k_cache, v_cache = (t.to(device) for t in (batch.q, batch.k_cache, batch.v_cache))
    out = kernel.prefix_attention(q, k_cache, v_cache, meta, scale, block_n=block_n or check.block_n)
    if out.dtype != check.dtype or out.shape != q.shape:
        return f"out is {out.dtype} {tuple(out.shape)}, expected {check.dtype} {tuple(q.shape)}"
    tol = TOLERANCE[check.dtype]
    try:
        torch.testing.assert_close(out.cpu().float(), expected.float(), atol=tol, rtol=tol)
    except AssertionError as e:
        return str(e)
    return None


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1: this runs the kernel in Triton's interpreter", file=sys.stderr)
        return 2
    from triton.runtime.interpreter import InterpretedFunction

    from kernels import triton_attention

    results: dict[str, str | None] = {
        "interpreted": None if isinstance(triton_attention._prefix_attention_kernel, InterpretedFunction)
        else "the kernel was compiled, not interpreted"}
    for check in CHECKS:
        try:
            results[check.id] = run_check(triton_attention, check)
        except Exception as e:  # a crash in one check must not hide the others' results
            results[check.id] = f"{type(e).__name__}: {e}"
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
