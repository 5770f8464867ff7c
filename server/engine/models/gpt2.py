"""GPT-2 forward over a packed batch with paged prefix KV.

HF's GPT-2 modules are used as loaded; this file owns the block loop, cache writes and
attention. Learned positions: a request's real tokens take wpe[P + t] after a prefix of
length P (PEFT's semantics).
"""

from __future__ import annotations

import torch

from kernels import AttentionMetadata, prefix_attention, write_kv


class GPT2Forward:
    def __init__(self, hf_model: torch.nn.Module) -> None:
        cfg = hf_model.config
        self.transformer = hf_model.transformer
        self.lm_head = hf_model.lm_head
        self.num_layers = cfg.n_layer
        self.num_heads = cfg.n_head
        self.num_kv_heads = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.embed_dim = cfg.n_embd

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                 meta: AttentionMetadata, logits_indices: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[0]
        tr = self.transformer
        h = tr.wte(input_ids) + tr.wpe(positions)  # [T, D]
        for i, block in enumerate(tr.h):
            attn = block.attn
            q, k, v = attn.c_attn(block.ln_1(h)).split(self.embed_dim, dim=-1)
            q = q.view(t, self.num_heads, self.head_dim)  # [T, H, hd]
            k = k.view(t, self.num_heads, self.head_dim)
            v = v.view(t, self.num_heads, self.head_dim)
            write_kv(kv_cache[i, 0], kv_cache[i, 1], k, v, meta.slot_mapping)
            o = prefix_attention(q, kv_cache[i, 0], kv_cache[i, 1], meta, attn.scaling)
            h = h + attn.c_proj(o.reshape(t, self.embed_dim))
            h = h + block.mlp(block.ln_2(h))
        h = tr.ln_f(h.index_select(0, logits_indices))
        return self.lm_head(h)  # [N, V]
