"""The teacher-forced forward of a frozen BART or T5 with one three-prefix (decoder, encoder
and cross parts), differentiable in the prefix: what the seq2seq trainer optimises.

It runs the same semantics as serving (server/engine/seq2seq.py, docs/peft-prefix-format.md):
the encoder and the cross-attention keys/values come from PrefixSeq2Seq.encode and
PrefixSeq2Seq.cross_attention themselves; the decoder sees its part through PEFT's block
mapping (layer l reads block (2l) % L), BART decoder token d at learned position P + d, T5's
self-attention bias with the query at P + d, slot s at s and token j at P + j. A test checks
these logits against the engine's greedy ones (tests/training/test_seq2seq_trainer.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache, EncoderDecoderCache

from server.engine.seq2seq import PrefixSeq2Seq


def teacher_forced_logits(engine: PrefixSeq2Seq, source_ids: Sequence[Sequence[int]], decoder_ids: torch.Tensor,
                          kv: torch.Tensor, encoder_kv: torch.Tensor | None = None,
                          cross_kv: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [B, T, vocab] of decoder_ids [B, T] (decoder start token first, right-padded:
    causal, so padding changes nothing before it) after encoding each row's source ids, every
    row with the same prefix: kv [L, 2, H, P, hd] and the optional parts."""
    b, t = decoder_ids.shape
    dev, dtype = engine.device, engine.dtype
    sources = [torch.as_tensor(list(x), dtype=torch.long) for x in source_ids]
    encoded, enc_mask = engine.encode(sources, [encoder_kv] * b)
    cross_cache, cross_mask = engine.cross_attention(encoded, enc_mask, [cross_kv] * b)
    p = int(kv.shape[3])
    kv = kv.to(dev, dtype)
    blocks = [engine.decoder_layer_block(layer) for layer in range(engine.spec.num_layers)]
    self_cache = DynamicCache([(kv[blk, 0].expand(b, -1, -1, -1), kv[blk, 1].expand(b, -1, -1, -1))
                               for blk in blocks])
    cache = EncoderDecoderCache(self_cache, cross_cache)
    causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
    visible = torch.cat([torch.ones(t, p, dtype=torch.bool, device=dev), causal], dim=1)  # [T, P + T]
    self_mask = torch.zeros((), dtype=dtype, device=dev).where(visible, torch.finfo(dtype).min)[None, None]
    dec, model = engine.decoder, engine.model
    x = decoder_ids.to(dev)
    if engine.arch == "bart":
        positions = dec.embed_positions
        h = dec.embed_tokens(x) + positions.weight[p + torch.arange(t, device=dev) + positions.offset][None].to(dtype)
        h = dec.layernorm_embedding(h)
        for layer in dec.layers:
            h = layer(h, self_mask, encoded, encoder_attention_mask=cross_mask, past_key_values=cache, use_cache=True)
        return model.lm_head(h) + model.final_logits_bias.to(h.dtype)
    h = dec.embed_tokens(x)
    bias = _t5_decoder_bias(engine, p, t)
    for block in dec.block:
        h = block(h, self_mask, bias, encoded, cross_mask, None, past_key_values=cache)[0]
    h = dec.final_layer_norm(h)
    if getattr(model.config, "scale_decoder_outputs", False):
        h = h * (model.model_dim ** -0.5)
    return model.lm_head(h)


def _t5_decoder_bias(engine: PrefixSeq2Seq, p: int, t: int) -> torch.Tensor:
    """[1, H, T, P + T]: query d at P + d; slot s at s, token j at P + j (causal buckets)."""
    attn = engine.decoder.block[0].layer[0].SelfAttention
    dev = engine.device
    queries = p + torch.arange(t, device=dev)
    keys = torch.cat([torch.arange(p, device=dev), queries])
    buckets = attn._relative_position_bucket(keys[None, :] - queries[:, None], bidirectional=False,
                                             num_buckets=attn.relative_attention_num_buckets,
                                             max_distance=attn.relative_attention_max_distance)
    return attn.relative_attention_bias(buckets).permute(2, 0, 1)[None]
