"""The Triton prefix-attention kernel against the torch reference.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors. TRITON_INTERPRET=1
only works if it is set before triton is first imported, and in a pytest session
transformers has usually imported triton already, so every interpreted check runs in
one subprocess (triton_check.py) and each check is reported here as its own test.
The compiled path is checked twice more: without a GPU, by compiling the kernel ahead of
time to a Hopper/Ampere cubin (catches type and shape errors the interpreter lets pass);
with CUDA present, by running it against the reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from triton_check import CHECKS, Check, run_check

pytest.importorskip("triton", reason="triton is not installed, so the GPU kernel cannot be checked")

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, str | None]:
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(HERE / "triton_check.py")], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"triton_check.py exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_checks_ran_in_the_interpreter(interpreted_results: dict[str, str | None]) -> None:
    assert interpreted_results["interpreted"] is None, interpreted_results["interpreted"]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.id)
def test_interpreted_kernel_matches_reference(interpreted_results: dict[str, str | None], check: Check) -> None:
    assert check.id in interpreted_results, f"triton_check.py did not report {check.id}"
    mismatch = interpreted_results[check.id]
    assert mismatch is None, mismatch


# (dtype, query rows per program, padded head_dim, sm arch): decode and prefill tiles.
AOT_CONFIGS = [("bf16", 16, 64, 90), ("fp32", 64, 64, 90), ("fp16", 64, 128, 80)]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter compiles nothing")
@pytest.mark.parametrize("dtype,block_m,block_d,arch", AOT_CONFIGS, ids=lambda v: str(v))
def test_kernel_compiles_for_gpu(dtype: str, block_m: int, block_d: int, arch: int) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels.triton_attention import _prefix_attention_kernel as kernel

    constexprs = {"GROUP": 3, "PAGE": 16, "BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_D": block_d,
                  "UPCAST_DOT": False, "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr"):
            signature[name] = f"*{dtype}"
        elif name.endswith("_ptr"):  # metadata: cu_seqlens, lengths, block tables, tiles
            signature[name] = "*i32"
        else:
            signature[name] = "fp32" if name == "qk_scale" else "i32"
    source = ASTSource(kernel, signature, {(kernel.arg_names.index(n),): v for n, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32))
    assert compiled.asm["cubin"], "no cubin produced"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernel needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_compiled_kernel_matches_reference(dtype: torch.dtype) -> None:
    from kernels import triton_attention

    failures = {}
    for check in CHECKS:
        if check.dtype == torch.float32:  # the same layouts, at every dtype and the real head_dim
            for head_dim in (64, 80):
                for block_n in (16, 64):
                    c = Check(check.case, check.block_size, check.group, dtype, head_dim)
                    failures[f"{c.id}-bn{block_n}"] = run_check(triton_attention, c, "cuda", block_n)
    failures = {k: v for k, v in failures.items() if v}
    assert not failures, failures
