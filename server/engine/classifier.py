"""PrefixClassifier: one frozen BERT classifier, many SEQ_CLS prefixes and heads, one forward.

What PEFT's PeftModelForSequenceClassification does for one prefix (peft 0.21.2,
transformers 5.23, read in their code and checked by tests/engine/test_classifier.py):

- the prefix enters every layer's self-attention as P extra keys/values (a DynamicCache);
- the attention mask is cat(ones(P), mask): every token sees the whole prefix;
- BERT's absolute positions start after the cache: token t sits at position P + t
  (BertEmbeddings uses position_ids[P : P + T]); token type ids are 0;
- then the pooler (first token), dropout (none in eval) and the adapter's own head.

A batch here mixes rows with different prefixes (each its own P, or none) and different
heads. Prefixes are left-aligned in a [B, H, Pmax, hd] cache and inputs in [B, Tmax]; the
mask hides both paddings and the position ids are P_i + t per row, so each row gets the
logits it would get alone. Keys are never rotated in BERT, so where a slot sits in the
cache does not matter, only that it is masked.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from server.engine.padded_prefixes import padded_prefix_kv
from server.prefix import ClassifierHead, ModelKind, ModelSpec, Prefix, PrefixError, validate_kv
from server.prefix.peft_format import SeqClsAdapter, check_head


class ClassifyError(ValueError):
    """A classification request that cannot run; the message has the numbers."""


@dataclass(frozen=True, eq=False)
class ClassifyInput:
    """One row: token ids (no padding), its prefix (or none) and its head (None: the base model's)."""

    input_ids: Sequence[int] | torch.Tensor
    prefix: Prefix | torch.Tensor | None = None  # kv [L, 2, Hkv, P, hd]
    head: ClassifierHead | None = None
    token_type_ids: Sequence[int] | torch.Tensor | None = None  # default: all 0

    @classmethod
    def of_adapter(cls, input_ids, adapter: SeqClsAdapter | None, token_type_ids=None) -> "ClassifyInput":
        """A row for a SEQ_CLS adapter (read_seq_cls_adapter), or for the bare base model."""
        if adapter is None:
            return cls(input_ids, None, None, token_type_ids)
        head = (None if adapter.head_weight is None
                else ClassifierHead(adapter.head_weight, adapter.head_bias, adapter.labels))
        return cls(input_ids, adapter.kv, head, token_type_ids)


@dataclass(frozen=True)
class Classification:
    """One row's result."""

    logits: torch.Tensor  # [num_labels], float32, on the host
    probs: torch.Tensor  # [num_labels], float32: softmax (sigmoid for multi-label models)
    labels: tuple[str, ...] | None  # names by index

    @property
    def label(self) -> str | int:
        """The most probable label: its name, or its index when the head has no names."""
        best = int(self.logits.argmax())
        return self.labels[best] if self.labels else best


class PrefixClassifier:
    """A frozen HF BertForSequenceClassification that classifies a batch of rows, each with
    its own prefix and head, in one forward pass of the encoder."""

    def __init__(self, model: torch.nn.Module, max_batch_tokens: int | None = None):
        if not hasattr(model, "bert") or not hasattr(model, "classifier"):
            raise ClassifyError(f"PrefixClassifier needs a BertForSequenceClassification, got {type(model).__name__}")
        self.model = model.eval().requires_grad_(False)
        cfg = model.config
        self.hidden_size = int(cfg.hidden_size)
        self.max_positions = int(cfg.max_position_embeddings)
        self.vocab_size = int(cfg.vocab_size)
        self.type_vocab_size = int(cfg.type_vocab_size)
        self.pad_token_id = int(cfg.pad_token_id or 0)
        self.multi_label = getattr(cfg, "problem_type", None) == "multi_label_classification"
        self.max_batch_tokens = max_batch_tokens
        # A config built in code names no architecture, so the kind is set, not read.
        self.spec = replace(ModelSpec.from_hf(model, self.max_positions), kind=ModelKind.SEQ_CLS)
        names = {int(k): str(v) for k, v in (getattr(cfg, "id2label", None) or {}).items()}
        base_labels = tuple(names[i] for i in range(len(names))) if sorted(names) == list(range(len(names))) else None
        self.base_head = ClassifierHead(model.classifier.weight, model.classifier.bias,
                                        base_labels if base_labels and len(base_labels) == cfg.num_labels else None)
        params = inspect.signature(model.bert.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers 5.24 renamed it

    @property
    def device(self) -> torch.device:
        return self.model.classifier.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.classifier.weight.dtype

    # ---- one batch

    @torch.inference_mode()
    def classify(self, batch: Sequence[ClassifyInput]) -> list[Classification]:
        """Per-row logits and probabilities, in the order of `batch`, from one encoder pass."""
        if not batch:
            return []
        rows = [self._check_row(i, row) for i, row in enumerate(batch)]
        ids, types, kvs = zip(*rows)
        b = len(rows)
        plens = [0 if kv is None else int(kv.shape[3]) for kv in kvs]
        tlens = [len(x) for x in ids]
        pmax, tmax = max(plens), max(tlens)
        if self.max_batch_tokens is not None and b * (pmax + tmax) > self.max_batch_tokens:
            raise ClassifyError(f"the batch pads to {b} rows * (prefix {pmax} + input {tmax}) = {b * (pmax + tmax)}"
                                f" tokens; the limit is {self.max_batch_tokens}")
        dev = self.device
        input_ids = torch.full((b, tmax), self.pad_token_id, dtype=torch.long)
        token_types = torch.zeros((b, tmax), dtype=torch.long)
        mask = torch.zeros((b, pmax + tmax), dtype=torch.long)
        positions = torch.zeros((b, tmax), dtype=torch.long)
        for i, (x, tt, p, t) in enumerate(zip(ids, types, plens, tlens)):
            input_ids[i, :t] = x
            if tt is not None:
                token_types[i, :t] = tt
            mask[i, :p] = 1
            mask[i, pmax:pmax + t] = 1
            # PEFT alone: token t at position P + t; padding stays in range and is masked.
            positions[i] = torch.arange(p, p + tmax).clamp(max=self.max_positions - 1)
        kwargs = {}
        if pmax:
            kwargs[self._cache_kw] = self._cache(kvs, pmax)
        out = self.model.bert(input_ids=input_ids.to(dev), attention_mask=mask.to(dev),
                              token_type_ids=token_types.to(dev), position_ids=positions.to(dev),
                              return_dict=True, **kwargs)
        pooled = out.pooler_output.float()  # [B, hidden]; classifier dropout is off in eval
        results = []
        for i, row in enumerate(batch):
            own = row.prefix.head if isinstance(row.prefix, Prefix) else None
            head = row.head or own or self.base_head
            logits = F.linear(pooled[i], head.weight.to(dev, torch.float32), head.bias.to(dev, torch.float32)).cpu()
            probs = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
            labels = head.labels
            if labels is None and head.num_labels == self.base_head.num_labels:
                labels = self.base_head.labels  # PEFT's model names them from the base config
            results.append(Classification(logits=logits, probs=probs, labels=labels))
        return results

    def _cache(self, kvs, pmax: int) -> DynamicCache:
        """[B, Hkv, Pmax, hd] keys and values per layer, each row's prefix left-aligned, zeros after."""
        spec = self.spec
        keys, values = padded_prefix_kv(kvs, spec, pmax, self.dtype, self.device)
        return DynamicCache([(keys[layer], values[layer]) for layer in range(spec.num_layers)])

    def _check_row(self, i: int, row: ClassifyInput):
        """(input ids, token type ids or None, kv or None) of row i, checked."""
        ids = torch.as_tensor(row.input_ids, dtype=torch.long).flatten().cpu()
        if ids.numel() == 0:
            raise ClassifyError(f"row {i} has no input tokens")
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.numel():
            raise ClassifyError(f"row {i} has token id {int(bad[0])}; the vocabulary has {self.vocab_size}")
        types = None
        if row.token_type_ids is not None:
            types = torch.as_tensor(row.token_type_ids, dtype=torch.long).flatten().cpu()
            if types.numel() != ids.numel():
                raise ClassifyError(f"row {i} has {types.numel()} token type ids for {ids.numel()} tokens")
            if types.numel() and (types.min() < 0 or types.max() >= self.type_vocab_size):
                raise ClassifyError(f"row {i} has a token type id outside 0..{self.type_vocab_size - 1}")
        kv = row.prefix
        if isinstance(kv, Prefix):
            if kv.spec != self.spec:
                raise PrefixError(f"row {i}'s prefix was checked against another model "
                                  f"(fingerprint {kv.spec.fingerprint}, this one {self.spec.fingerprint})")
            kv = kv.kv
        elif kv is not None:
            validate_kv(kv, self.spec, f"row {i}'s prefix")
        p = 0 if kv is None else int(kv.shape[3])
        if p + ids.numel() > self.max_positions:
            raise ClassifyError(f"row {i} needs positions up to prefix {p} + input {ids.numel()} = "
                                f"{p + ids.numel()}; the model has {self.max_positions}")
        if row.head is not None:
            check_head(row.head.weight, row.head.bias, self.hidden_size)
        return ids, types, kv
