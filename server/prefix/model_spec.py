"""What a prefix must match in the loaded base model, read from a HF model in one place."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from enum import Enum

import torch


class ModelKind(str, Enum):
    """What a base model does, and so which routes and which prefixes fit it.

    - causal_lm: a decoder-only LM (Llama family, Qwen2/3, GPT-2); PEFT task CAUSAL_LM.
    - seq2seq_lm: an encoder-decoder LM (BART, T5); PEFT task SEQ_2_SEQ_LM.
    - seq_cls: an encoder with a classification head (BERT); PEFT task SEQ_CLS.
    """

    CAUSAL_LM = "causal_lm"
    SEQ2SEQ_LM = "seq2seq_lm"
    SEQ_CLS = "seq_cls"

    @classmethod
    def of_config(cls, config) -> "ModelKind":
        """The kind a HF config describes: its `architectures` first, then
        `is_encoder_decoder`; a config that names neither is a causal LM."""
        for arch in getattr(config, "architectures", None) or ():
            if arch.endswith("ForSequenceClassification"):
                return cls.SEQ_CLS
            if arch.endswith("ForConditionalGeneration") or arch.endswith("ForSeq2SeqLM"):
                return cls.SEQ2SEQ_LM
            if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
                return cls.CAUSAL_LM
        return cls.SEQ2SEQ_LM if getattr(config, "is_encoder_decoder", False) else cls.CAUSAL_LM

    @property
    def peft_task_type(self) -> str:
        return {"causal_lm": "CAUSAL_LM", "seq2seq_lm": "SEQ_2_SEQ_LM", "seq_cls": "SEQ_CLS"}[self.value]


@dataclass(frozen=True)
class ModelSpec:
    num_layers: int
    num_kv_heads: int  # GQA models: the key/value heads, not the query heads
    head_dim: int
    fingerprint: str  # model_fingerprint(): these weights, not just this shape
    max_model_len: int  # context length: prefix + prompt + output
    kind: ModelKind = ModelKind.CAUSAL_LM  # a prefix is checked against the kind too

    @classmethod
    def from_hf(cls, model: torch.nn.Module, max_model_len: int | None = None) -> "ModelSpec":
        """The spec of a HF causal LM (Llama family and GPT-2: their configs map the names)."""
        cfg = model.config
        heads = cfg.num_attention_heads
        return cls(num_layers=int(cfg.num_hidden_layers),
                   num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
                   head_dim=int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads),
                   fingerprint=model_fingerprint(model),
                   max_model_len=int(max_model_len or cfg.max_position_embeddings),
                   kind=ModelKind.of_config(cfg))

    def kv_shape(self, prefix_len: int) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.num_kv_heads, prefix_len, self.head_dim)

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes one prefix token takes in `dtype` (keys and values of every layer)."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * dtype.itemsize

    def peft_token_dim(self) -> int:
        """PEFT's token_dim for this model (it uses the kv heads for GQA models)."""
        return self.num_kv_heads * self.head_dim


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the architecture and of a few weights: prefixes record it.

    Two checkpoints with the same shapes but different weights get different
    fingerprints, so a prefix trained for one is refused by the other. The hash reads a
    fixed number of values, so it costs the same for any model size.
    """
    cfg = model.config
    arch = {k: getattr(cfg, k, None) for k in ("model_type", "num_hidden_layers", "hidden_size",
                                               "num_attention_heads", "num_key_value_heads",
                                               "vocab_size", "n_layer", "n_embd", "n_head")}
    h = hashlib.sha256(json.dumps(arch, sort_keys=True).encode())
    for _, p in list(model.named_parameters())[:4]:
        h.update(p.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
