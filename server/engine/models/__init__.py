"""Per-architecture forwards that reuse HF modules and own attention and cache."""

from __future__ import annotations

import torch

from server.engine.models.gpt2 import GPT2Forward
from server.engine.models.llama import LlamaForward

LLAMA_FAMILY = {"llama", "qwen2", "qwen3"}
SUPPORTED = sorted(LLAMA_FAMILY | {"gpt2"})


def build_forward(hf_model: torch.nn.Module) -> LlamaForward | GPT2Forward:
    model_type = hf_model.config.model_type
    if model_type in LLAMA_FAMILY:
        return LlamaForward(hf_model)
    if model_type == "gpt2":
        return GPT2Forward(hf_model)
    raise NotImplementedError(f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED)}")
