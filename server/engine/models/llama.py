"""Llama-family forward (Llama, SmolLM2, Qwen2, Qwen3) over a packed batch with paged prefix KV.

Built once from the HF model: its embeddings, rotary embedding and norm weights are used
as loaded; q/k/v and gate/up are fused into one projection each (PackedLinear); this file
owns the layer loop, the cache writes and the attention call. Positions come from the
caller: a request's real tokens sit at P, P+1, ... after its prefix of length P, and
prefix keys are stored unrotated (docs/architecture.md).

The residual stream is carried as vLLM does: `add_rms_norm` adds a sublayer's output into
the residual and normalizes it in one pass, rounding exactly where HF's layer rounds.
"""

from __future__ import annotations

import torch

from kernels import AttentionMetadata, layer_ops, prefix_attention
from server.engine.models.packed_linear import PackedLinear


class _Layer:
    def __init__(self, layer: torch.nn.Module) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = PackedLinear([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o = PackedLinear([attn.o_proj])
        self.input_norm = layer.input_layernorm.weight.detach()
        self.post_attention_norm = layer.post_attention_layernorm.weight.detach()
        self.q_norm = getattr(attn, "q_norm", None)  # Qwen3: per-head norms before RoPE
        self.k_norm = getattr(attn, "k_norm", None)
        self.scale = attn.scaling
        self.gate_up = PackedLinear([mlp.gate_proj, mlp.up_proj])
        self.down = PackedLinear([mlp.down_proj])


class LlamaForward:
    def __init__(self, hf_model: torch.nn.Module) -> None:
        cfg = hf_model.config
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act {cfg.hidden_act!r} is not supported (the Llama family uses silu)")
        model = hf_model.model
        self.embed_tokens = model.embed_tokens
        self.rotary_emb = model.rotary_emb
        self.final_norm = model.norm.weight.detach()
        self.eps = float(model.norm.variance_epsilon)
        self.lm_head = PackedLinear([hf_model.lm_head])
        self.layers = [_Layer(layer) for layer in model.layers]
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.ops = layer_ops(next(hf_model.parameters()).device)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                 meta: AttentionMetadata, logits_indices: torch.Tensor) -> torch.Tensor:
        # input_ids, positions: [T]; kv_cache: [L, 2, num_blocks, block_size, Hkv, hd]
        # logits_indices: [N] rows of the packed batch whose next token is sampled
        ops, eps, t = self.ops, self.eps, input_ids.shape[0]
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        residual = self.embed_tokens(input_ids)  # [T, D]
        cos, sin = self.rotary_emb(residual[None], positions[None])  # [1, T, hd]
        cos, sin = cos[0].contiguous(), sin[0].contiguous()
        x = ops.rms_norm(residual, self.layers[0].input_norm, eps)
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(x)  # [T, (H + 2 Hkv) * hd]
            q = qkv[:, :q_width].view(t, self.num_heads, self.head_dim)  # [T, H, hd]
            k = qkv[:, q_width:q_width + kv_width].view(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, hd]
            v = qkv[:, q_width + kv_width:].view(t, self.num_kv_heads, self.head_dim)
            if layer.q_norm is not None:
                q, k = layer.q_norm(q), layer.k_norm(k)
            ops.rotary(q, cos, sin)
            ops.rotary_and_store(k, v, cos, sin, kv_cache[i, 0], kv_cache[i, 1], meta.slot_mapping)
            o = prefix_attention(q, kv_cache[i, 0], kv_cache[i, 1], meta, layer.scale)
            x = ops.add_rms_norm(layer.o(o.reshape(t, q_width)), residual, layer.post_attention_norm, eps)
            x = layer.down(ops.silu_and_mul(layer.gate_up(x)))
            if i + 1 < len(self.layers):
                x = ops.add_rms_norm(x, residual, self.layers[i + 1].input_norm, eps)
            else:
                residual.add_(x)
        h = ops.rms_norm(residual.index_select(0, logits_indices), self.final_norm, eps)
        return self.lm_head(h)  # [N, V]
