"""Reading a prefix from local files: a PEFT adapter folder or a safetensors file."""

from __future__ import annotations

from pathlib import Path

import torch

from server.engine.prefix import ModelSpec, PrefixError, from_prompt_embeddings, load_peft_adapter


def load_prefix_file(path: str | Path, spec: ModelSpec, num_virtual_tokens: int | None = None) -> torch.Tensor:
    """kv [L, 2, Hkv, P, hd] from a PEFT adapter folder, or a safetensors file holding
    `prefix_kv` [L, 2, Hkv, P, hd] or PEFT's `prompt_embeddings` [P, L*2*Hkv*hd]."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        return load_peft_adapter(path, spec)
    if path.suffix != ".safetensors":
        raise PrefixError(f"{path.name}: expected a PEFT adapter folder or a .safetensors file "
                          "(pickle files such as .bin or .pt are refused)")
    tensors = load_file(path)
    if "prefix_kv" in tensors:
        return tensors["prefix_kv"]
    if "prompt_embeddings" in tensors:
        return from_prompt_embeddings(tensors["prompt_embeddings"], spec, num_virtual_tokens)
    raise PrefixError(f"{path.name} holds {sorted(tensors)}; expected 'prefix_kv' or 'prompt_embeddings'")
