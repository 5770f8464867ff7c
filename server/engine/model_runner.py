"""Runs one packed forward pass: all scheduled tokens of all requests, whatever their prefix.

The KV pool lives here, one tensor for all layers:

    kv_cache: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]   # 0 = key

stored head-major ([..., num_blocks, num_kv_heads, block_size, head_dim] in memory), so one
kv head's slots of a block are contiguous: an attention kernel reading one head streams
whole blocks (18% faster decode attention on a CPU, measured) instead of every third row.
Kernels take it by its strides.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels import AttentionMetadata
from server.engine.models import build_forward
from server.engine.request import Request


@dataclass
class ModelInput:
    input_ids: torch.Tensor  # [T] the step's new tokens, requests packed back to back
    positions: torch.Tensor  # [T] P_b + own position (prefix of length P_b comes first)
    attn: AttentionMetadata
    # [N + M]: the last row of each request that samples this step (N), then the rows whose
    # logits score prompt tokens (M, requests with prompt_logprobs)
    logits_indices: torch.Tensor
    sample_rows: list[int]  # [N] index into the scheduled list of each sampled request
    prompt_rows: list[PromptRows] = field(default_factory=list)


@dataclass
class PromptRows:
    """`count` logits rows that score prompt tokens first..first+count-1 of `request`."""

    request: Request
    first: int
    count: int


@dataclass
class StepLogits:
    sampled: torch.Tensor  # [N, V] in the model's dtype
    requests: list[Request]  # [N] the requests they sample for
    prompt: torch.Tensor  # [M, V] rows scoring prompt tokens, in prompt_rows order
    prompt_rows: list[PromptRows]


class ModelRunner:
    def __init__(self, hf_model: torch.nn.Module, num_blocks: int, block_size: int) -> None:
        self.forward = build_forward(hf_model)
        self.device = next(hf_model.parameters()).device
        self.dtype = next(hf_model.parameters()).dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        f = self.forward
        self.kv_cache = torch.zeros(f.num_layers, 2, num_blocks, f.num_kv_heads, block_size, f.head_dim,
                                    dtype=self.dtype, device=self.device).transpose(3, 4)

    @staticmethod
    def block_bytes(hf_model: torch.nn.Module, block_size: int) -> int:
        f = build_forward(hf_model)
        itemsize = next(hf_model.parameters()).element_size()
        return f.num_layers * 2 * block_size * f.num_kv_heads * f.head_dim * itemsize

    def write_prefix(self, blocks: list[int], kv: torch.Tensor) -> None:
        """Copy a prefix kv [L, 2, Hkv, P, hd] into its blocks (slots 0..P-1 in order).

        One strided copy per block (a prefix of 16 tokens is one), on one CPU thread: an
        indexed put over the pool, or a copy by an OpenMP team of 2 on 2 cores busy with other
        work, took 2-12 ms for a 360 KiB SmolLM2 prefix; one thread takes ~15 us
        (bench/prefix_load_profile.py)."""
        kv = kv.to(self.device, self.dtype)
        pool = self.kv_cache.transpose(3, 4)  # [L, 2, num_blocks, Hkv, block_size, hd], as stored
        threads = torch.get_num_threads()
        if self.device.type == "cpu":
            torch.set_num_threads(1)
        try:
            for i, block in enumerate(blocks):
                first = i * self.block_size
                n = min(self.block_size, kv.shape[3] - first)
                if n <= 0:
                    break
                pool[:, :, block, :, :n].copy_(kv[:, :, :, first:first + n])
        finally:
            torch.set_num_threads(threads)

    def read_slots(self, blocks: list[int], n: int) -> torch.Tensor:
        """The keys and values in slots 0..n-1 of `blocks`, as a prefix kv [L, 2, Hkv, n, hd]
        (the inverse of write_prefix)."""
        s = torch.arange(n, device=self.device)
        block = torch.tensor(blocks, dtype=torch.long, device=self.device)[s // self.block_size]
        return self.kv_cache[:, :, block, s % self.block_size].permute(0, 1, 3, 2, 4).contiguous()

    def copy_block(self, src: int, dst: int) -> None:
        """Copy block `src`'s slots, every layer, keys and values, into block `dst`."""
        self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

    def prepare(self, scheduled: list[Request], num_new_tokens: list[int]) -> ModelInput:
        ids: list[int] = []
        positions: list[int] = []
        logits_indices: list[int] = []
        sample_rows: list[int] = []
        seq_lens: list[int] = []
        prompt_indices: list[int] = []
        prompt_rows: list[PromptRows] = []
        for row, (req, q) in enumerate(zip(scheduled, num_new_tokens)):
            start = req.num_computed_tokens
            offset = len(ids)
            ids += req.all_token_ids[start:start + q]
            positions += range(req.prefix_len + start, req.prefix_len + start + q)
            seq_lens.append(start + q)
            if start + q == req.num_tokens:  # this step reaches the end: sample the next token
                logits_indices.append(len(ids) - 1)
                sample_rows.append(row)
            if req.sampling.prompt_logprobs is not None and req.index == 0:  # sample 0 reports them
                # the row of token t scores prompt token t + 1; skip those scored already
                # (a preempted request recomputes its prompt)
                begin = max(start, len(req.prompt_logprobs) - 1)
                end = min(start + q, len(req.prompt_token_ids) - 1)
                if end > begin:
                    prompt_indices += range(offset + begin - start, offset + end - start)
                    prompt_rows.append(PromptRows(req, begin + 1, end - begin))
        attn = AttentionMetadata.build(
            q_lens=num_new_tokens,
            prefix_lens=[r.prefix_len for r in scheduled],
            prefix_blocks=[r.prefix_blocks for r in scheduled],
            seq_lens=seq_lens,
            own_blocks=[r.own_blocks for r in scheduled],
            block_size=self.block_size,
            device=self.device,
        )
        return ModelInput(
            input_ids=torch.tensor(ids, dtype=torch.long, device=self.device),
            positions=torch.tensor(positions, dtype=torch.long, device=self.device),
            attn=attn,
            logits_indices=torch.tensor(logits_indices + prompt_indices, dtype=torch.long, device=self.device),
            sample_rows=sample_rows,
            prompt_rows=prompt_rows,
        )

    def run(self, scheduled: list[Request], num_new_tokens: list[int]) -> StepLogits:
        """One step: the logits of the sampled rows and of the prompt rows to score."""
        inp = self.prepare(scheduled, num_new_tokens)
        logits = self.execute(inp)
        n = len(inp.sample_rows)
        return StepLogits(logits[:n], [scheduled[row] for row in inp.sample_rows], logits[n:], inp.prompt_rows)

    @torch.inference_mode()
    def execute(self, inp: ModelInput) -> torch.Tensor:
        """Logits [N, V] of the sampled rows, in the model's dtype (the sampler upcasts the rows
        it samples; greedy rows need only their argmax, which the dtype does not change)."""
        # With no sampled rows (prefill chunks only) the layers still run for their cache writes.
        return self.forward(inp.input_ids, inp.positions, self.kv_cache, inp.attn, inp.logits_indices)
