"""Llama-family forward (Llama, SmolLM2, Qwen2) over a packed batch with paged prefix KV.

The HF modules (embeddings, norms, MLPs, projections, rotary embedding, lm_head) are used
as loaded; this file owns only the layer loop, the cache writes and the attention call.
Positions come from the caller: a request's real tokens sit at P, P+1, ... after its
prefix of length P, and prefix keys are stored unrotated (docs/architecture.md).
"""

from __future__ import annotations

import torch

from kernels import AttentionMetadata, prefix_attention, write_kv


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaForward:
    def __init__(self, hf_model: torch.nn.Module) -> None:
        cfg = hf_model.config
        self.model = hf_model.model
        self.lm_head = hf_model.lm_head
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                 meta: AttentionMetadata, logits_indices: torch.Tensor) -> torch.Tensor:
        # input_ids, positions: [T]; kv_cache: [L, 2, num_blocks, block_size, Hkv, hd]
        # logits_indices: [N] rows of the packed batch whose next token is sampled
        t = input_ids.shape[0]
        h = self.model.embed_tokens(input_ids)  # [T, D]
        cos, sin = self.model.rotary_emb(h[None], positions[None])  # [1, T, hd]
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # [T, 1, hd]
        for i, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(t, self.num_heads, self.head_dim)  # [T, H, hd]
            k = attn.k_proj(x).view(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, hd]
            v = attn.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
            if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms before RoPE
                q, k = attn.q_norm(q), attn.k_norm(k)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            write_kv(kv_cache[i, 0], kv_cache[i, 1], k, v, meta.slot_mapping)
            o = prefix_attention(q, kv_cache[i, 0], kv_cache[i, 1], meta, attn.scaling)
            h = h + attn.o_proj(o.reshape(t, self.num_heads * self.head_dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = self.model.norm(h.index_select(0, logits_indices))
        return self.lm_head(h)  # [N, V]
