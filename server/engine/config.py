"""Engine configuration: sizes of the KV pool and of a step. Checks itself."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16  # tokens per KV block
    num_blocks: int | None = None  # None: as many as fit in kv_cache_bytes
    kv_cache_bytes: int = 512 * 2**20  # budget for the KV pool when num_blocks is None
    max_num_seqs: int = 128  # running requests at most
    # The pool's last blocks (this fraction, rounded down) are kept for a tenant running fewer
    # requests than it would get if one more tenant arrived (scheduler.py, _admit): a flood
    # of one tenant's requests stops there, so a newcomer starts at once.
    kv_reserve_fraction: float = 1 / 16
    max_num_batched_tokens: int = 1024  # tokens in one forward pass (prefill chunks + decodes)
    # Query x key pairs of prefill attention in one step (new tokens x the keys each attends
    # to): a long prompt's chunks shrink as its context grows, so a step stays short.
    prefill_attention_budget: int = 1 << 20
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    guide_compile_timeout_s: float = 20.0  # structured output: longer compiles are refused (guided_decoding.py)

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks}")
        if self.kv_cache_bytes < 1:
            raise ValueError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if not 0 <= self.kv_reserve_fraction < 1:
            raise ValueError(f"kv_reserve_fraction must be in [0, 1), got {self.kv_reserve_fraction}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")
        if self.prefill_attention_budget < 1:
            raise ValueError(f"prefill_attention_budget must be positive, got {self.prefill_attention_budget}")
        if not self.guide_compile_timeout_s > 0:
            raise ValueError(f"guide_compile_timeout_s must be positive, got {self.guide_compile_timeout_s}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
