"""PrefixSeq2Seq: one frozen BART or T5, many SEQ_2_SEQ_LM prefixes, one forward per step.

What PEFT's PeftModelForSeq2SeqLM does for one prefix (peft 0.21.2, transformers 5.23, read
in their code and checked by tests/engine/test_seq2seq.py):

- the encoder never sees the prefix: PEFT passes its cache to the decoder only;
- `get_prompt` views the adapter's [P, L * 2 * hidden] rows as [P, 2L, H, hd], concatenates
  them with themselves (num_transformer_submodules = 2) to 4L blocks and splits them into
  groups of 4: (self key, self value, cross key, cross value) of each decoder layer. PEFT
  then empties the cross-attention cache, so the cross copies are dropped and decoder layer l
  gets, in our kv [L, 2, H, P, hd] layout, the self-attention prefix kv[(2 * l) % L]
  (with L even, the odd blocks are never used);
- every decoder query sees the whole prefix (the mask is cat(ones(P), causal));
- BART: the learned decoder positions start after the cache: decoder token d sits at
  position P + d (embed_positions row P + d + 2);
- T5: the relative position bias is computed with the query at P + d and the keys at
  0 .. P + d (prefix slot s at s, decoder token j at P + j): between decoder tokens the
  bias is that of no prefix (j - d), and prefix slot s is at distance -(P + d - s).

The three-prefix form (ours, Li & Liang's BART code; docs/peft-prefix-format.md): a Prefix
may also carry `encoder_kv` [L, 2, H, P_enc, hd] and `cross_kv` [L, 2, H, P_cross, hd]; `kv`
stays the decoder self-attention part above, with PEFT's block mapping (2l) % L, so the
decoder part of any prefix is exactly a PEFT adapter.

- encoder part: block l gives encoder layer l's self-attention P_enc extra keys/values,
  before the tokens'; every encoder query sees all of them (bidirectional, like the tokens).
  The token positions are unchanged (BART: learned positions 0 .. S-1). T5, following the
  decoder part: prefix slot s sits at key position s and encoder token i at P_enc + i, so
  between tokens the bias is that of no prefix (j - i) and slot s is at distance
  -(P_enc + i - s), bucketed bidirectionally as the encoder's own bias is;
- cross part: block l is prepended to the cross-attention keys/values of decoder layer l
  (the encoder outputs' projections); every decoder query sees all of them. Cross-attention
  has no positions in BART or T5 (T5's cross bias is zero), so no position is involved.

A batch mixes rows with different prefixes (each its own P, or none) and input lengths. The
encoder runs once for the whole batch (inputs right-padded and masked). The decoder then
feeds one token per row per step: prefixes are left-aligned in a [B, H, Pmax, hd]
self-attention cache, the padding after each is masked, and BART positions and T5 biases
are computed per row from that row's P, so each row gets the logits it would get alone.
The encoder parts are left-aligned in Pmax_enc extra slots per encoder layer and the cross
parts in Pmax_cross slots before each row's encoder keys, padding masked in both. The
cross-attention keys and values of every layer are computed once, before the first step
(`cross_attention`), and read from the cache (transformers' EncoderDecoderCache). Decoding
is greedy and stops at eos or at the row's max_new_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import DynamicCache, EncoderDecoderCache

from server.engine.padded_prefixes import padded_prefix_kv
from server.prefix import ModelKind, ModelSpec, Prefix, PrefixError, model_fingerprint, validate_kv


class Seq2SeqError(ValueError):
    """A generation request that cannot run; the message has the numbers."""


@dataclass(frozen=True, eq=False)
class Seq2SeqInput:
    """One row: encoder token ids (no padding), its prefix (or none) and how many tokens to generate."""

    input_ids: Sequence[int] | torch.Tensor
    prefix: Prefix | torch.Tensor | None = None  # kv [L, 2, H, P, hd]; a Prefix may carry encoder/cross parts
    max_new_tokens: int = 16


@dataclass(frozen=True)
class Seq2SeqOutput:
    """One row's result."""

    token_ids: list[int]  # the generated tokens (not the decoder start token), eos included when reached
    finish_reason: str  # "eos" or "length"
    logits: torch.Tensor | None  # [len(token_ids), vocab], float32 on the host; None unless asked


@dataclass(eq=False)
class DecoderState:
    """One running row between decoder steps: plain tensors on the model's device, held by
    the row until it ends (not in the paged KV pool; a prefix is copied into each row's own)."""

    cross: torch.Tensor  # [L, 2, H, S, hd] cross-attention keys and values, computed once at admission
    own: torch.Tensor  # [L, 2, H, P + max_new_tokens, hd] self-attention: the prefix, then one slot per token
    prefix_len: int  # P
    length: int  # slots of `own` filled: P + decoder tokens fed so far

    @property
    def nbytes(self) -> int:
        return self.cross.numel() * self.cross.element_size() + self.own.numel() * self.own.element_size()


@dataclass(eq=False)
class DecodeBatch:
    """The running rows of a decoder step, with their cross kv padded together: a filled
    cache, built once while the rows stay the same (HF's layers only read a filled one)."""

    states: list[DecoderState]
    cross_cache: DynamicCache  # layer l: keys and values [B, H, Smax, hd]
    cross_mask: torch.Tensor  # [B, 1, 1, Smax] additive: 0 over a row's encoder tokens, min after


class PrefixSeq2Seq:
    """A frozen HF BartForConditionalGeneration or T5ForConditionalGeneration that generates
    greedily for a batch of rows, each with its own prefix, one decoder pass per step."""

    def __init__(self, model: torch.nn.Module):
        cfg = model.config
        if hasattr(model, "model") and hasattr(model.model, "decoder") and hasattr(model.model.decoder, "embed_positions"):
            self.arch = "bart"
            self.decoder = model.model.decoder
            layers, dec_layers = int(cfg.encoder_layers), int(cfg.decoder_layers)
            heads, dec_heads = int(cfg.encoder_attention_heads), int(cfg.decoder_attention_heads)
            head_dim = int(cfg.d_model) // heads
            self.max_input_len = int(cfg.max_position_embeddings)
            self.max_decoder_positions: int | None = int(cfg.max_position_embeddings)
        elif hasattr(model, "decoder") and hasattr(model.decoder, "block"):
            self.arch = "t5"
            self.decoder = model.decoder
            layers, dec_layers = int(cfg.num_layers), int(cfg.num_decoder_layers)
            heads = dec_heads = int(cfg.num_heads)
            head_dim = int(cfg.d_kv)
            self.max_input_len = int(getattr(cfg, "n_positions", None) or 512)  # T5 has no hard limit
            self.max_decoder_positions = None
        else:
            raise Seq2SeqError(f"PrefixSeq2Seq needs a BartForConditionalGeneration or a "
                               f"T5ForConditionalGeneration, got {type(model).__name__}")
        # PEFT sizes the prefix from the encoder's numbers (num_hidden_layers, num_attention_heads,
        # hidden_size) and gives it to the decoder: refuse models where the two differ.
        if (dec_layers, dec_heads, heads * head_dim) != (layers, heads, int(cfg.d_model)):
            raise Seq2SeqError(f"PEFT's prefix layout needs decoder layers = encoder layers ({dec_layers} vs "
                               f"{layers}), decoder heads = encoder heads ({dec_heads} vs {heads}) and heads * "
                               f"head_dim = d_model ({heads} * {head_dim} vs {cfg.d_model})")
        self.model = model.eval().requires_grad_(False)
        self.encoder = model.get_encoder()
        self.vocab_size = int(cfg.vocab_size)
        self.pad_token_id = int(cfg.pad_token_id)
        self.eos_token_ids = frozenset(_generation_setting(model, "eos_token_id"))
        [self.decoder_start_token_id] = _generation_setting(model, "decoder_start_token_id")
        self.spec = ModelSpec(num_layers=layers, num_kv_heads=heads, head_dim=head_dim,
                              fingerprint=model_fingerprint(model),
                              max_model_len=self.max_decoder_positions or self.max_input_len,
                              kind=ModelKind.SEQ2SEQ_LM)

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    def decoder_layer_block(self, layer: int) -> int:
        """The prefix block (index into kv's first dim) that PEFT gives decoder layer `layer`."""
        return (2 * layer) % self.spec.num_layers

    # ---- one batch

    @torch.inference_mode()
    def generate(self, batch: Sequence[Seq2SeqInput], return_logits: bool = False) -> list[Seq2SeqOutput]:
        """Greedy tokens per row, in the order of `batch`: one encoder pass, then one decoder
        pass per step for all rows still running."""
        if not batch:
            return []
        rows = [self._check_row(i, row) for i, row in enumerate(batch)]
        ids, kvs, limits, encoder_kvs, cross_kvs = zip(*rows)
        b, dev = len(rows), self.device
        plens = torch.tensor([0 if kv is None else int(kv.shape[3]) for kv in kvs])
        pmax, steps = int(plens.max()), max(limits)

        encoded, enc_mask = self.encode(ids, encoder_kvs)
        cross_cache, cross_mask = self.cross_attention(encoded, enc_mask, cross_kvs)

        # Decoder self-attention slots: Pmax prefix slots (row i's first P_i are real), then one per step.
        visible = torch.zeros((b, pmax + steps), dtype=torch.bool)
        visible[:, pmax:] = True
        for i, p in enumerate(plens.tolist()):
            visible[i, :p] = True
        visible = visible.to(dev)
        plens = plens.to(dev)
        cache = EncoderDecoderCache(self._prefix_cache(kvs, pmax), cross_cache)

        tokens = torch.full((b,), self.decoder_start_token_id, dtype=torch.long, device=dev)
        out_ids: list[list[int]] = [[] for _ in range(b)]
        out_logits: list[list[torch.Tensor]] = [[] for _ in range(b)]
        finish: list[str | None] = [None] * b
        for step in range(steps):
            self_mask = self._additive(visible[:, None, None, :pmax + step + 1])
            logits = self._step(tokens, step, plens, pmax, encoded, cross_mask, self_mask, cache).float()
            tokens = logits.argmax(-1)
            chosen = tokens.tolist()
            for i in range(b):
                if finish[i] is not None:
                    continue  # a finished row rides along; its outputs are not read
                out_ids[i].append(chosen[i])
                if return_logits:
                    out_logits[i].append(logits[i].cpu())
                if chosen[i] in self.eos_token_ids:
                    finish[i] = "eos"
                elif len(out_ids[i]) == limits[i]:
                    finish[i] = "length"
            if all(f is not None for f in finish):
                break
        return [Seq2SeqOutput(token_ids=out_ids[i], finish_reason=finish[i],
                              logits=torch.stack(out_logits[i]) if return_logits else None)
                for i in range(b)]

    def _step(self, tokens, step, plens, pmax, encoded, cross_mask, self_mask, cache) -> torch.Tensor:
        """Logits [B, vocab] of one decoder token per row (row i's token `step`)."""
        dec = self.decoder
        x = tokens[:, None]
        if self.arch == "bart":
            positions = dec.embed_positions
            # PEFT alone: decoder token `step` at position P + step (learned embeddings are offset by 2).
            h = dec.embed_tokens(x) + positions.weight[plens + step + positions.offset][:, None].to(self.dtype)
            h = dec.layernorm_embedding(h)
            for layer in dec.layers:
                h = layer(h, self_mask, encoded, encoder_attention_mask=cross_mask,
                          past_key_values=cache, use_cache=True)
            return self.model.lm_head(h[:, 0]) + self.model.final_logits_bias[0].to(h.dtype)
        h = dec.embed_tokens(x)
        bias = self._t5_bias(plens, pmax, step)
        for block in dec.block:
            h, _, _ = block(h, self_mask, bias, encoded, cross_mask, None, past_key_values=cache)
        h = dec.final_layer_norm(h[:, 0])
        if getattr(self.model.config, "scale_decoder_outputs", False):
            h = h * (self.model.model_dim ** -0.5)
        return self.model.lm_head(h)

    # ---- the encoder and the cross-attention keys/values, once per batch

    def encode(self, ids, encoder_kvs) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoder outputs [B, S, d], token mask [B, S] bool): right-padded inputs, padding
        masked (the outputs there are never read); with encoder parts, every layer's
        self-attention also sees each row's own (`_encode_with_prefixes`)."""
        b, smax = len(ids), max(len(x) for x in ids)
        enc_ids = torch.full((b, smax), self.pad_token_id, dtype=torch.long)
        enc_mask = torch.zeros((b, smax), dtype=torch.bool)
        for i, x in enumerate(ids):
            enc_ids[i, :len(x)] = x
            enc_mask[i, :len(x)] = True
        enc_ids, enc_mask = enc_ids.to(self.device), enc_mask.to(self.device)
        if all(kv is None for kv in encoder_kvs):
            encoded = self.encoder(input_ids=enc_ids, attention_mask=enc_mask.long(), return_dict=True).last_hidden_state
            return encoded, enc_mask
        return self._encode_with_prefixes(enc_ids, enc_mask, encoder_kvs), enc_mask

    def _encode_with_prefixes(self, enc_ids: torch.Tensor, enc_mask: torch.Tensor, encoder_kvs) -> torch.Tensor:
        """The encoder's layers, each layer l's self-attention with row i's encoder block l
        (left-aligned in Pmax slots, padding masked) as a cache before the tokens' keys."""
        plens, slot_visible, keys, values = self._padded_part(encoder_kvs)
        cache = DynamicCache([(keys[layer], values[layer]) for layer in range(self.spec.num_layers)])
        mask = self._additive(torch.cat([slot_visible, enc_mask], dim=1)[:, None, None, :])  # [B, 1, 1, Pmax + S]
        enc = self.encoder
        if self.arch == "bart":
            h = enc.embed_tokens(enc_ids) + enc.embed_positions(enc_ids).to(self.dtype)  # positions 0 .. S-1
            h = enc.layernorm_embedding(h)
            for layer in enc.layers:
                h = layer(h, mask, past_key_values=cache)
            return h
        h = enc.embed_tokens(enc_ids)
        bias = self._t5_encoder_bias(plens, int(slot_visible.shape[1]), enc_ids.shape[1])
        for block in enc.block:
            h = block(h, mask, bias, past_key_values=cache)[0]
        return enc.final_layer_norm(h)

    def _t5_encoder_bias(self, plens: torch.Tensor, pmax: int, seq_len: int) -> torch.Tensor:
        """[B, H, S, Pmax + S] encoder self-attention bias: prefix slot s at key position s,
        token i at P_i + i (so between tokens, j - i as without a prefix), bidirectional buckets."""
        attn = self.encoder.block[0].layer[0].SelfAttention
        dev = plens.device
        tokens = plens[:, None] + torch.arange(seq_len, device=dev)  # [B, S]
        keys = torch.cat([torch.arange(pmax, device=dev)[None].expand(len(plens), -1), tokens], dim=1)  # [B, K]
        relative = keys[:, None, :] - tokens[:, :, None]  # [B, S, K]
        buckets = attn._relative_position_bucket(relative, bidirectional=True,
                                                 num_buckets=attn.relative_attention_num_buckets,
                                                 max_distance=attn.relative_attention_max_distance)
        return attn.relative_attention_bias(buckets).permute(0, 3, 1, 2)  # [B, H, S, K]

    def cross_attention(self, encoded: torch.Tensor, enc_mask: torch.Tensor, cross_kvs) -> tuple[DynamicCache, torch.Tensor]:
        """(cross-attention cache, mask [B, 1, 1, Pmax + S]): decoder layer l's keys/values are
        row i's cross block l (left-aligned in Pmax slots, padding masked) and then the
        projections of the encoder outputs, computed here once for the whole generate."""
        b, seq_len = enc_mask.shape
        _, slot_visible, keys, values = self._padded_part(cross_kvs)
        layers = []
        for layer in range(self.spec.num_layers):
            if self.arch == "bart":
                attn = self.decoder.layers[layer].encoder_attn
                k_proj, v_proj = attn.k_proj, attn.v_proj
            else:
                attn = self.decoder.block[layer].layer[1].EncDecAttention
                k_proj, v_proj = attn.k, attn.v
            shape = (b, seq_len, self.spec.num_kv_heads, self.spec.head_dim)
            k = k_proj(encoded).view(shape).transpose(1, 2)  # [B, H, S, hd]
            v = v_proj(encoded).view(shape).transpose(1, 2)
            layers.append((torch.cat([keys[layer], k], dim=2), torch.cat([values[layer], v], dim=2)))
        mask = self._additive(torch.cat([slot_visible, enc_mask], dim=1)[:, None, None, :])
        return DynamicCache(layers), mask

    def _padded_part(self, parts):
        """(lengths [B], slot visibility [B, Pmax] bool, keys and values [L, B, H, Pmax, hd])
        of one part (encoder or cross) of each row, left-aligned; Pmax = 0 when no row has one."""
        plens = torch.tensor([0 if kv is None else int(kv.shape[3]) for kv in parts], device=self.device)
        pmax = int(plens.max())
        visible = torch.arange(pmax, device=self.device)[None, :] < plens[:, None]
        keys, values = padded_prefix_kv(parts, self.spec, pmax, self.dtype, self.device)
        return plens, visible, keys, values

    def _t5_bias(self, plens: torch.Tensor, pmax: int, step: int) -> torch.Tensor:
        """[B, H, 1, Pmax + step + 1] self-attention bias of row i's query at P_i + step, with
        prefix slot s at key position s and decoder token j at P_i + j (PEFT alone)."""
        attn = self.decoder.block[0].layer[0].SelfAttention
        slots = torch.arange(pmax + step + 1, device=plens.device)
        prefix_pos = slots[None, :pmax].expand(len(plens), -1)  # padding slots are masked anyway
        token_pos = plens[:, None] + torch.arange(step + 1, device=plens.device)
        keys = torch.cat([prefix_pos, token_pos], dim=1)  # [B, K]
        relative = keys - (plens + step)[:, None]
        buckets = attn._relative_position_bucket(relative, bidirectional=False,
                                                 num_buckets=attn.relative_attention_num_buckets,
                                                 max_distance=attn.relative_attention_max_distance)
        return attn.relative_attention_bias(buckets).permute(0, 2, 1)[:, :, None, :]  # [B, H, 1, K]

    def _additive(self, visible: torch.Tensor) -> torch.Tensor:
        """A float mask from a bool one: 0 where visible, the dtype's minimum elsewhere."""
        zero = torch.zeros((), dtype=self.dtype, device=visible.device)
        return torch.where(visible, zero, torch.finfo(self.dtype).min)

    def _prefix_cache(self, kvs, pmax: int) -> DynamicCache:
        """The decoder self-attention cache: layer l holds block (2l) % L of each row's prefix,
        left-aligned in Pmax slots, zeros after (masked)."""
        if pmax == 0:
            return DynamicCache()
        spec = self.spec
        keys, values = padded_prefix_kv(kvs, spec, pmax, self.dtype, self.device)
        blocks = [self.decoder_layer_block(layer) for layer in range(spec.num_layers)]
        return DynamicCache([(keys[blk], values[blk]) for blk in blocks])

    def _check_row(self, i: int, row: Seq2SeqInput):
        """(input ids, kv or None, max_new_tokens, encoder part or None, cross part or None)
        of row i, checked."""
        ids = torch.as_tensor(row.input_ids, dtype=torch.long).flatten().cpu()
        if ids.numel() == 0:
            raise Seq2SeqError(f"row {i} has no input tokens")
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.numel():
            raise Seq2SeqError(f"row {i} has token id {int(bad[0])}; the vocabulary has {self.vocab_size}")
        if ids.numel() > self.max_input_len:
            raise Seq2SeqError(f"row {i} has {ids.numel()} input tokens; the encoder takes at most {self.max_input_len}")
        limit = row.max_new_tokens
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise Seq2SeqError(f"row {i} has max_new_tokens {limit!r}; expected a positive integer")
        kv, encoder_kv, cross_kv = row.prefix, None, None
        if isinstance(kv, Prefix):
            if kv.spec != self.spec:
                raise PrefixError(f"row {i}'s prefix was checked against another model "
                                  f"(fingerprint {kv.spec.fingerprint}, this one {self.spec.fingerprint})")
            kv, encoder_kv, cross_kv = kv.kv, kv.encoder_kv, kv.cross_kv
        elif kv is not None:
            validate_kv(kv, self.spec, f"row {i}'s prefix")
        p = 0 if kv is None else int(kv.shape[3])
        if self.max_decoder_positions is not None and p + limit > self.max_decoder_positions:
            raise Seq2SeqError(f"row {i} needs decoder positions up to prefix {p} + max_new_tokens {limit} = "
                               f"{p + limit}; the model has {self.max_decoder_positions}")
        return ids, kv, limit, encoder_kv, cross_kv


    # ---- step by step: the server loop (server/engine/seq2seq_core.py) admits rows between
    # decoder steps. Each row's encoder pass and cross-attention keys and values are computed
    # once, when it is admitted, and held in its DecoderState (plain tensors, not paged).

    @torch.inference_mode()
    def encode_rows(self, inputs: Sequence[torch.Tensor], encoder_kvs: Sequence[torch.Tensor | None]
                    ) -> list[torch.Tensor]:
        """The encoder's last hidden states [S_i, d_model] of each row's ids, in one padded
        pass (`encode`, with each row's encoder part if it has one)."""
        hidden, _ = self.encode([torch.as_tensor(x, dtype=torch.long) for x in inputs], encoder_kvs)
        return [hidden[i, :len(x)] for i, x in enumerate(inputs)]

    @torch.inference_mode()
    def cross_kv(self, encoded: torch.Tensor, cross_part: torch.Tensor | None = None) -> torch.Tensor:
        """[L, 2, H, P_cross + S, hd]: every decoder layer's cross-attention keys and values over
        one row's encoder output [S, d_model], after its cross part (block l for layer l) if any."""
        if self.arch == "bart":
            projections = [(layer.encoder_attn.k_proj, layer.encoder_attn.v_proj) for layer in self.decoder.layers]
        else:
            projections = [(block.layer[1].EncDecAttention.k, block.layer[1].EncDecAttention.v)
                           for block in self.decoder.block]
        spec = self.spec
        cross = torch.stack([torch.stack([k(encoded), v(encoded)])  # [2, S, H * hd]
                             .view(2, -1, spec.num_kv_heads, spec.head_dim).transpose(1, 2)
                             for k, v in projections])
        if cross_part is None:
            return cross
        return torch.cat([cross_part.to(cross.device, cross.dtype), cross], dim=3)

    def decoder_state(self, cross: torch.Tensor, prefix: Prefix | torch.Tensor | None, max_new_tokens: int
                      ) -> DecoderState:
        """A row's state before its first decoder step: its cross kv [L, 2, H, S, hd], and
        self-attention slots for its prefix (decoder layer l gets block (2l) % L) and for
        max_new_tokens decoder tokens."""
        kv = prefix.kv if isinstance(prefix, Prefix) else prefix
        p = 0 if kv is None else int(kv.shape[3])
        spec = self.spec
        own = torch.zeros((spec.num_layers, 2, spec.num_kv_heads, p + max_new_tokens, spec.head_dim),
                          dtype=self.dtype, device=self.device)
        if kv is not None:
            blocks = [self.decoder_layer_block(layer) for layer in range(spec.num_layers)]
            own[:, :, :, :p] = kv.to(self.device, self.dtype)[blocks]
        return DecoderState(cross=cross, own=own, prefix_len=p, length=p)

    def decode_batch(self, states: Sequence[DecoderState]) -> DecodeBatch:
        """The rows' cross kv padded into one batch (the core rebuilds it only when the rows
        change: building it copies every row's cross kv, ~50 MB for 64 BART rows of 128)."""
        smax = max(s.cross.shape[3] for s in states)
        spec = self.spec
        keys = torch.zeros((spec.num_layers, len(states), spec.num_kv_heads, smax, spec.head_dim),
                           dtype=self.dtype, device=self.device)
        values = torch.zeros_like(keys)
        visible = torch.zeros((len(states), smax), dtype=torch.bool, device=self.device)
        for i, s in enumerate(states):
            n = s.cross.shape[3]
            keys[:, i, :, :n] = s.cross[:, 0]
            values[:, i, :, :n] = s.cross[:, 1]
            visible[i, :n] = True
        cross = DynamicCache([(keys[layer], values[layer]) for layer in range(spec.num_layers)])
        return DecodeBatch(list(states), cross, self._additive(visible[:, None, None, :]))

    @torch.inference_mode()
    def decode_step(self, batch: DecodeBatch, tokens: Sequence[int]) -> torch.Tensor:
        """Logits [B, vocab] (model dtype) of each row's next decoder token `tokens[i]`; its
        self-attention key and value are appended to the row's state.

        Row i's slots 0 .. length_i - 1 (prefix, then its earlier tokens) are left-aligned in
        a [B, H, Kmax, hd] cache, padding masked; the new token's slot is Kmax. Its position is
        length_i (BART: embed_positions row length_i + 2; T5: the relative bias with the query
        at length_i, slot k at position k, the new slot at length_i), as for the row alone."""
        states, dev = batch.states, self.device
        lengths = torch.tensor([s.length for s in states], device=dev)  # [B]
        kmax = int(lengths.max())
        spec = self.spec
        if kmax:
            keys = torch.zeros((spec.num_layers, len(states), spec.num_kv_heads, kmax, spec.head_dim),
                               dtype=self.dtype, device=dev)
            values = torch.zeros_like(keys)
            for i, s in enumerate(states):
                keys[:, i, :, :s.length] = s.own[:, 0, :, :s.length]
                values[:, i, :, :s.length] = s.own[:, 1, :, :s.length]
            self_cache = DynamicCache([(keys[layer], values[layer]) for layer in range(spec.num_layers)])
        else:
            self_cache = DynamicCache()
        cache = EncoderDecoderCache(self_cache, batch.cross_cache)  # cross filled: HF's layers read it as is
        slots = torch.arange(kmax + 1, device=dev)
        visible = (slots[None, :] < lengths[:, None]) | (slots[None, :] == kmax)  # [B, Kmax + 1]
        self_mask = self._additive(visible[:, None, None, :])
        # HF's layers run cross-attention only when given encoder states; with the cross cache
        # filled they never read them (nor project them again): a placeholder stands in.
        placeholder = torch.zeros((len(states), 0, int(self.model.config.d_model)), dtype=self.dtype, device=dev)
        x = torch.as_tensor(list(tokens), dtype=torch.long, device=dev)[:, None]
        dec = self.decoder
        if self.arch == "bart":
            positions = dec.embed_positions
            h = dec.embed_tokens(x) + positions.weight[lengths + positions.offset][:, None].to(self.dtype)
            h = dec.layernorm_embedding(h)
            for layer in dec.layers:
                h = layer(h, self_mask, placeholder, encoder_attention_mask=batch.cross_mask,
                          past_key_values=cache, use_cache=True)
            logits = self.model.lm_head(h[:, 0]) + self.model.final_logits_bias[0].to(h.dtype)
        else:
            bias = self._t5_step_bias(lengths, kmax)
            h = dec.embed_tokens(x)
            for block in dec.block:
                h, _, _ = block(h, self_mask, bias, placeholder, batch.cross_mask, None, past_key_values=cache)
            h = dec.final_layer_norm(h[:, 0])
            if getattr(self.model.config, "scale_decoder_outputs", False):
                h = h * (self.model.model_dim ** -0.5)
            logits = self.model.lm_head(h)
        layers = cache.self_attention_cache.layers
        new = torch.stack([torch.stack([layer.keys[:, :, kmax], layer.values[:, :, kmax]]) for layer in layers])
        for i, s in enumerate(states):  # new: [L, 2, B, H, hd], the new token's slot of every row
            s.own[:, :, :, s.length] = new[:, :, i]
            s.length += 1
        return logits

    def _t5_step_bias(self, lengths: torch.Tensor, kmax: int) -> torch.Tensor:
        """[B, H, 1, Kmax + 1] self-attention bias of row i's query at position length_i:
        slot k < Kmax at position k (padding slots are masked), the new slot at length_i."""
        attn = self.decoder.block[0].layer[0].SelfAttention
        keys = torch.arange(kmax + 1, device=lengths.device)[None, :].repeat(len(lengths), 1)
        keys[:, kmax] = lengths
        buckets = attn._relative_position_bucket(keys - lengths[:, None], bidirectional=False,
                                                 num_buckets=attn.relative_attention_num_buckets,
                                                 max_distance=attn.relative_attention_max_distance)
        return attn.relative_attention_bias(buckets).permute(0, 2, 1)[:, :, None, :]


def _generation_setting(model: torch.nn.Module, name: str) -> list[int]:
    """Token ids as HF generate reads them: the generation config first, then the model config."""
    value = getattr(getattr(model, "generation_config", None), name, None)
    value = getattr(model.config, name, None) if value is None else value
    if value is None or value == []:
        raise Seq2SeqError(f"{type(model).__name__}'s config names no {name}")
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
