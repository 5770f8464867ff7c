"""The CPU kernels in kernels/csrc/cpu_ops.cpp, built once per machine at first use.

    paged_attention(q, k_cache, v_cache, meta, scale, max_q_len, out)  paged, varlen, GQA, fp32 math
    rms_norm, add_rms_norm, rotary (in place), rotary_and_store, silu_and_mul, argmax_rows: the
    signatures of kernels/torch_ops.py

torch's JIT extension loader compiles the source with -O3 -march=native (~25 s on two
cores) into a folder under the cache directory named after a hash of the source, the CPU's
flags, the compiler flags and the torch version, so a change of any of them builds afresh and a binary built
for another CPU is never loaded. Where it cannot build (no compiler), `ops()` is None and
callers use the pure-torch path.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
from pathlib import Path

import torch

from kernels.attention_metadata import AttentionMetadata

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "cpu_ops.cpp"
DISABLE_ENV = "PREFIX_SERVE_CPU_KERNELS"  # "0": never build or use them
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _build_dir() -> Path:
    base = Path(os.environ.get("PREFIX_SERVE_CACHE_DIR", Path.home() / ".cache" / "prefix-serve"))
    return base / "kernels"


@functools.cache
def ops():
    """The compiled module, or None (a warning says why) when it cannot be built here."""
    if os.environ.get(DISABLE_ENV) == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode() + _cpu_flags().encode()
                                + torch.__version__.encode())
        name = f"prefix_serve_cpu_{digest.hexdigest()[:12]}"
        folder = _build_dir() / name
        folder.mkdir(parents=True, exist_ok=True)
        # NOTE: torch guards a build with a plain "lock" file that a killed build leaves behind,
        # and every later load then waits on it forever. Builds here are serialised by flock
        # instead (released when the process dies), so under it any "lock" file is stale.
        with open(folder / "build.flock", "w") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            (folder / "lock").unlink(missing_ok=True)
            return load(name=name, sources=[str(SOURCE)], build_directory=str(folder),
                        extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja: the torch path still works
        log.warning("CPU kernels could not be built (%s); using the pure-torch path", e)
        return None


def available() -> bool:
    return ops() is not None


# ---- the ops, with the signatures of kernels/torch_ops.py

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return ops().rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return ops().add_rms_norm(x, residual, weight, eps)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    ops().rotary(x, cos, sin)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return ops().silu_and_mul(gate_up)


def rotary_and_store(k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    ops().rotary_and_store(k, v, cos, sin, k_cache, v_cache, slot_mapping)


def softmax_lse(scores: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [rows, n] -> (softmax(scale * scores) in float32 rounded to their dtype, and
    log(sum(exp(scale * scores))) [rows] float32)."""
    probs, lse = ops().softmax_lse(scores, scale)
    return probs, lse


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    return ops().argmax_rows(x)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, max_q_len: int, out: torch.Tensor) -> None:
    """Attention of the requests with at most `max_q_len` new tokens, written into their rows
    of `out` (the other rows are left alone). q: [T, H, hd]; caches [num_blocks, block_size, Hkv, hd]."""
    ops().prefix_attention(q, k_cache, v_cache, meta.cu_seqlens_q, meta.prefix_lens, meta.prefix_block_tables,
                           meta.seq_lens, meta.block_tables, scale, max_q_len, out)
