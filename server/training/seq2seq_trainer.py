"""Prefix-tuning of a frozen BART or T5 in the three-prefix form (Li & Liang 2021, their BART
code): a decoder part, an encoder part and a cross-attention part, each trained through its
own MLP reparameterization and started from real words.

NOTE: the invariants
- The base model is frozen; the only trainable parameters are three reparam.PrefixMLP
  (an embedding of P_part tokens -> Linear(d_model, mid) -> tanh -> Linear -> every layer's
  K/V), one per part. After training only their outputs are kept: plain kv tensors, float32.
- The forward is seq2seq_forward.teacher_forced_logits, which serves the same semantics as
  PrefixSeq2Seq (it calls the engine's own encoder and cross-attention methods): what is
  trained is what is served.
- The decoder part has PEFT's layout (decoder layer l reads block (2l) % L), so
  `peft_format.write_adapter` exports it as a SEQ_2_SEQ_LM adapter that PEFT loads.
- Real-word init (`real_word_init`): the keys/values the frozen model computes for the
  words of `init_text` (or the first example's source): the encoder's self-attention K/V of
  the words for the encoder part, the decoder's self-attention K/V with the words as
  decoder input for the decoder part (decoder layer l's at block (2l) % L), and the
  cross-attention K/V of the encoded words for the cross part; each part takes the first
  P_part of them (words repeated when too few). The MLPs reproduce it exactly at step 0
  (PrefixMLP.fit_output).
- Loss: mean cross-entropy over the target tokens (eos included).
- Same seed, same examples, same config -> same prefix (CPU).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from server.engine.seq2seq import PrefixSeq2Seq
from server.training.reparam import PrefixMLP
from server.training.seq2seq_forward import teacher_forced_logits

IGNORE = -100
PARTS = ("decoder", "encoder", "cross")


@dataclass(frozen=True)
class Seq2SeqExample:
    source_ids: tuple[int, ...]  # encoder input, as the server will get it
    target_ids: tuple[int, ...]  # what the decoder must generate, eos last


@dataclass(frozen=True)
class Seq2SeqTrainConfig:
    num_virtual_tokens: int = 10  # P of the decoder part
    encoder_tokens: int = 10  # P_enc of the encoder part (0 = none)
    cross_tokens: int = 10  # P_cross of the cross-attention part (0 = none)
    steps: int = 100
    learning_rate: float = 5e-3  # AdamW, constant
    batch_size: int = 8
    mid_dim: int = 512  # hidden width of each MLP
    init_text: str | None = None  # real words to start from; None = the first example's source
    seed: int = 0
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        for name, low in (("num_virtual_tokens", 1), ("encoder_tokens", 0), ("cross_tokens", 0), ("steps", 1),
                          ("batch_size", 1), ("mid_dim", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        longest = max(self.num_virtual_tokens, self.encoder_tokens, self.cross_tokens)
        if longest > self.mid_dim:
            raise ValueError(f"a part of {longest} virtual tokens cannot start from real words through mid_dim "
                             f"{self.mid_dim}; each part's length must be <= mid_dim")
        if not (isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate)
                and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}")

    def lengths(self) -> dict[str, int]:
        return {"decoder": self.num_virtual_tokens, "encoder": self.encoder_tokens, "cross": self.cross_tokens}


@dataclass
class Seq2SeqTrainResult:
    kv: torch.Tensor  # [L, 2, H, P, hd] float32: the decoder part (PEFT layout)
    encoder_kv: torch.Tensor | None  # [L, 2, H, P_enc, hd] float32, or None
    cross_kv: torch.Tensor | None  # [L, 2, H, P_cross, hd] float32, or None
    init: dict[str, torch.Tensor]  # part -> the real-word kv it started from
    losses: list[float] = field(default_factory=list)  # one per step
    seconds: float = 0.0


def real_word_init(engine: PrefixSeq2Seq, word_ids: Sequence[int], lengths: dict[str, int]) -> dict[str, torch.Tensor]:
    """part -> kv [L, 2, H, P_part, hd] float32 of the real words (see the module's note)."""
    n = max(lengths.values())
    ids = torch.tensor([(list(word_ids) * (n // len(word_ids) + 1))[:n]], device=engine.device)
    if engine.arch == "bart":
        enc = [(a.k_proj, a.v_proj) for a in (layer.self_attn for layer in engine.encoder.layers)]
        dec = [(a.k_proj, a.v_proj) for a in (layer.self_attn for layer in engine.decoder.layers)]
        cross = [(a.k_proj, a.v_proj) for a in (layer.encoder_attn for layer in engine.decoder.layers)]
    else:
        enc = [(b.layer[0].SelfAttention.k, b.layer[0].SelfAttention.v) for b in engine.encoder.block]
        dec = [(b.layer[0].SelfAttention.k, b.layer[0].SelfAttention.v) for b in engine.decoder.block]
        cross = [(b.layer[1].EncDecAttention.k, b.layer[1].EncDecAttention.v) for b in engine.decoder.block]
    seen: dict[torch.nn.Module, torch.Tensor] = {}
    modules = [m for group in (enc, dec, cross) for pair in group for m in pair]
    hooks = [m.register_forward_hook(lambda m, args, out: seen.setdefault(m, out.detach())) for m in modules]
    try:
        with torch.no_grad():
            engine.model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    spec = engine.spec

    def stacked(group) -> torch.Tensor:  # [L, 2, H, n, hd]
        per_layer = [torch.stack([seen[m][0].view(n, spec.num_kv_heads, spec.head_dim).transpose(0, 1)
                                  for m in pair]) for pair in group]
        return torch.stack(per_layer).float().cpu()

    decoder_layers = stacked(dec)
    decoder_blocks = decoder_layers.clone()  # block b defaults to layer b's; used blocks get their layer's
    for layer in reversed(range(spec.num_layers)):
        decoder_blocks[engine.decoder_layer_block(layer)] = decoder_layers[layer]
    full = {"decoder": decoder_blocks, "encoder": stacked(enc), "cross": stacked(cross)}
    return {part: full[part][:, :, :, :p].contiguous() for part, p in lengths.items() if p > 0}


def train_three_prefix(engine: PrefixSeq2Seq, examples: Sequence[Seq2SeqExample], config: Seq2SeqTrainConfig,
                       tokenizer=None, progress=None) -> Seq2SeqTrainResult:
    """Train the three parts on `examples` with engine's model frozen; see the module's note.
    `progress(step, total, loss)` returning False stops early."""
    if not examples:
        raise ValueError("no examples to train on")
    for i, e in enumerate(examples):
        if not e.source_ids or not e.target_ids:
            raise ValueError(f"example {i} has {len(e.source_ids)} source and {len(e.target_ids)} target tokens; "
                             "both must be at least 1")
    if config.init_text is not None:
        if tokenizer is None:
            raise ValueError("init_text needs a tokenizer")
        words = list(tokenizer(config.init_text, add_special_tokens=False)["input_ids"])
        if not words:
            raise ValueError(f"init text {config.init_text!r} has no tokens")
    else:
        words = list(examples[0].source_ids)
    spec, d_model = engine.spec, int(engine.model.config.d_model)
    lengths = config.lengths()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        init = real_word_init(engine, words, lengths)
        mlps = {}
        for part, kv in init.items():
            mlp = PrefixMLP(lengths[part], spec.num_layers, spec.num_kv_heads, spec.head_dim, d_model, config.mid_dim)
            mlp.fit_output(kv)
            mlps[part] = mlp.to(engine.device)
    params = [p for mlp in mlps.values() for p in mlp.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    order = torch.Generator().manual_seed(config.seed)
    size = min(config.batch_size, len(examples))
    result = Seq2SeqTrainResult(kv=init["decoder"], encoder_kv=init.get("encoder"), cross_kv=init.get("cross"),
                                init=init)
    started = time.monotonic()
    queue: list[int] = []
    for step in range(1, config.steps + 1):
        while len(queue) < size:
            queue += torch.randperm(len(examples), generator=order).tolist()
        batch, queue = [examples[i] for i in queue[:size]], queue[size:]
        decoder_ids, labels = _decoder_batch(engine, batch)
        parts = {part: mlp() for part, mlp in mlps.items()}
        logits = teacher_forced_logits(engine, [e.source_ids for e in batch], decoder_ids, parts["decoder"],
                                       parts.get("encoder"), parts.get("cross"))
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"loss became {value} at step {step}; lower the learning rate "
                                     f"({config.learning_rate})")
        result.losses.append(value)
        if progress is not None and progress(step, config.steps, value) is False:
            break
    with torch.no_grad():  # fold each MLP into its plain kv
        folded = {part: mlp().detach().float().cpu().contiguous() for part, mlp in mlps.items()}
    result.kv, result.encoder_kv, result.cross_kv = folded["decoder"], folded.get("encoder"), folded.get("cross")
    result.seconds = time.monotonic() - started
    return result


def _decoder_batch(engine: PrefixSeq2Seq, batch: Sequence[Seq2SeqExample]) -> tuple[torch.Tensor, torch.Tensor]:
    """(decoder inputs [B, T]: start token then the target but its last; labels [B, T]: the
    target, IGNORE on padding), right-padded."""
    t = max(len(e.target_ids) for e in batch)
    ids = torch.full((len(batch), t), engine.pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), t), IGNORE, dtype=torch.long)
    for row, e in enumerate(batch):
        target = list(e.target_ids)
        ids[row, :len(target)] = torch.tensor([engine.decoder_start_token_id] + target[:-1])
        labels[row, :len(target)] = torch.tensor(target)
    return ids.to(engine.device), labels.to(engine.device)


def tokenize_seq2seq(tokenizer, examples, eos_token_id: int) -> list[Seq2SeqExample]:
    """Seq2SeqExamples of data.Example (prompt -> completion): the source as the tokenizer
    encodes a text (special tokens included), the target without them, then eos."""
    out = []
    for e in examples:
        if e.is_chat:
            raise ValueError("chat examples cannot train a seq2seq prefix; give prompt and completion")
        source = list(tokenizer(e.prompt)["input_ids"])
        target = list(tokenizer(e.completion, add_special_tokens=False)["input_ids"]) + [eos_token_id]
        out.append(Seq2SeqExample(tuple(source), tuple(target)))
    return out
