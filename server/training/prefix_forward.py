"""The frozen HF model run with a prefix as its past key/values: the training forward, the
same call that reproduces PEFT (docs/peft-prefix-format.md, "Equivalent HF call").

`forward_with_prefix` runs right-padded rows (the reference); `forward_packed` runs rows of
packed sequences (packing.py) and returns only the logits asked for, which is what the
trainer uses: the same logits for the same tokens, with no padding, each shared beginning
computed once, and the LM head (a [hidden, vocab] matmul) only where a loss needs it.

Semantics, for kv [L, 2, Hkv, P, hd] and a batch of B rows of T tokens (right-padded):

    cache    = DynamicCache(layer l: keys kv[l, 0], values kv[l, 1], broadcast over B)
    mask     = cat(ones(B, P), attention_mask)          # every query sees all P slots
    position = P + t for the t-th real token             # keys of the prefix never rotated
    logits   = model(input_ids, mask, position_ids, past_key_values=cache).logits

A fresh cache is built for each call because HF's forward appends to it. DynamicCache
(transformers 5.x) concatenates with torch.cat and never detaches, so gradients reach kv.
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers import DynamicCache

from server.training.packing import PackedRows


def cache_argument(model: torch.nn.Module, cache: DynamicCache) -> dict[str, DynamicCache]:
    """The keyword that hands `cache` to the model's forward: transformers 5.24 renamed
    `past_key_values` to `cache` (the old name still works there, with a warning)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def prefix_dynamic_cache(kv: torch.Tensor, batch_size: int) -> DynamicCache:
    """A DynamicCache that holds kv [L, 2, Hkv, P, hd] for each of `batch_size` rows."""
    layers = []
    for layer in kv.unbind(0):
        # [Hkv, P, hd] -> [B, Hkv, P, hd]; expand is a view, the cache's cat copies it.
        key = layer[0].unsqueeze(0).expand(batch_size, -1, -1, -1)
        value = layer[1].unsqueeze(0).expand(batch_size, -1, -1, -1)
        layers.append((key, value))
    return DynamicCache(layers)


def forward_with_prefix(
    model: torch.nn.Module,
    kv: torch.Tensor | None,  # [L, 2, Hkv, P, hd] or None for the bare model
    input_ids: torch.Tensor,  # [B, T], right-padded
    attention_mask: torch.Tensor | None = None,  # [B, T], 1 = real token
) -> torch.Tensor:
    """Logits [B, T, V] of the frozen model with `kv` as its prefix; differentiable in kv."""
    batch, length = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if kv is None:
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    dtype = next(model.parameters()).dtype
    kv = kv.to(device=input_ids.device, dtype=dtype)
    prefix_len = kv.shape[3]
    mask = torch.cat([attention_mask.new_ones(batch, prefix_len), attention_mask], dim=1)
    # Right padding: the t-th token of every row is a real token or trailing pad, so P + t
    # is right for all real tokens (pads are masked out of the loss).
    positions = torch.arange(prefix_len, prefix_len + length, device=input_ids.device).expand(batch, -1)
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        **cache_argument(model, prefix_dynamic_cache(kv, batch)),
        use_cache=True,
    )
    return out.logits


def forward_packed(
    model: torch.nn.Module,
    kv: torch.Tensor | None,  # [L, 2, Hkv, P, hd] or None for the bare model
    rows: PackedRows,
    outputs: torch.Tensor,  # [N] flat indices r * T + t of the tokens whose logits are wanted (repeats allowed)
) -> torch.Tensor:
    """Logits [N, V] of the frozen model with `kv` as prefix, at `outputs`; differentiable in kv.

    Semantics: token t of row r sees every prefix slot and the row's tokens that
    rows.visible[r, t] marks, at position P + rows.positions[r, t]; the logits of a token
    are those it has in each packed sequence that contains it.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    batch, length = rows.input_ids.shape
    prefix_len = 0 if kv is None else kv.shape[3]
    # An additive mask (0 = seen) works with every attention implementation. Every query
    # sees the prefix slots, so no row of the softmax is empty when there is a prefix; a pad
    # without one sees only large negatives (finfo.min, not -inf: no NaN).
    mask = torch.zeros(batch, 1, length, prefix_len + length, dtype=dtype, device=device)
    mask[:, 0, :, prefix_len:].masked_fill_(~rows.visible.to(device), torch.finfo(dtype).min)
    outputs = outputs.to(device)
    keep = torch.zeros(batch * length, dtype=torch.bool, device=device)
    keep[outputs] = True
    kept = keep.nonzero().squeeze(1)  # sorted: the order logits_to_keep returns them in
    where = torch.searchsorted(kept, outputs)
    extra = {"use_cache": False} if kv is None else {
        **cache_argument(model, prefix_dynamic_cache(kv.to(device, dtype), batch)), "use_cache": True}
    if _takes_logits_to_keep(type(model)):
        extra["logits_to_keep"] = keep.view(batch, length)  # [N_unique, V]: the LM head only where needed
    logits = model(input_ids=rows.input_ids.to(device), attention_mask=mask,
                   position_ids=(rows.positions + prefix_len).to(device), **extra).logits
    if "logits_to_keep" not in extra:
        logits = logits.flatten(0, 1)[kept]
    return logits[where]


@functools.cache
def _takes_logits_to_keep(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


@torch.no_grad()
def prefix_past(model: torch.nn.Module, kv: torch.Tensor | None, token_ids: list[int]) -> torch.Tensor:
    """The model's own past key/values for `token_ids` read after prefix `kv`.

    Returns [L, 2, Hkv, n, hd] float32: the keys are those HF caches (rotated at their
    positions), which is what a prefix stores, so cat(kv, result) as a prefix behaves
    exactly like kv followed by these tokens.
    """
    device = next(model.parameters()).device
    ids = torch.tensor([token_ids], device=device)
    prefix_len = 0 if kv is None else kv.shape[3]
    cache = DynamicCache() if kv is None else prefix_dynamic_cache(kv.to(device, next(model.parameters()).dtype), 1)
    mask = torch.ones(1, prefix_len + len(token_ids), dtype=torch.long, device=device)
    positions = torch.arange(prefix_len, prefix_len + len(token_ids), device=device).unsqueeze(0)
    model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **cache_argument(model, cache))
    layers = []
    for layer in cache.layers:
        # [1, Hkv, P+n, hd] -> the last n slots: this text's own keys and values
        layers.append(torch.stack([layer.keys[0, :, prefix_len:], layer.values[0, :, prefix_len:]]))
    return torch.stack(layers).float()
