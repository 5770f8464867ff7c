"""Write a trained prefix as a HF PEFT PREFIX_TUNING adapter folder.

Mirrors what `get_peft_model(model, PrefixTuningConfig(prefix_projection=True)).save_pretrained()`
writes (peft 0.21.2): `adapter_config.json` and `adapter_model.safetensors` holding one
float32 tensor `prompt_embeddings` [P, L*2*token_dim], the MLP's output (PEFT runs the MLP
at save time and never saves it). For GQA models PEFT sets num_attention_heads =
num_kv_heads and token_dim = head_dim * num_kv_heads; for GPT-2 those are the full heads,
which the same formula gives. `PeftModel.from_pretrained(base, folder)` loads it in
inference mode, where the embedding holds the prefix directly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from server.engine.prefix import ModelSpec, to_prompt_embeddings, validate_kv

PEFT_VERSION = "0.21.2"  # the layout written, checked against this version


def peft_adapter_config(spec: ModelSpec, num_virtual_tokens: int, mid_dim: int,
                        base_model_name_or_path: str | None = None) -> dict:
    return {
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "encoder_hidden_size": mid_dim,
        "inference_mode": True,
        "init_weights": None,
        "modules_to_save": None,
        "num_attention_heads": spec.num_kv_heads,
        "num_layers": spec.num_layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": num_virtual_tokens,
        "peft_type": "PREFIX_TUNING",
        "peft_version": PEFT_VERSION,
        "prefix_projection": True,
        "revision": None,
        "task_type": "CAUSAL_LM",
        "token_dim": spec.peft_token_dim(),
    }


def export_peft_adapter(kv: torch.Tensor, folder: str | Path, spec: ModelSpec, mid_dim: int = 512,
                        base_model_name_or_path: str | None = None) -> Path:
    """Write kv [L, 2, Hkv, P, hd] into `folder` (created); returns the folder.

    Each file is written under a temporary name and renamed, so a reader never sees a
    half-written tensor.
    """
    validate_kv(kv, spec, "trained prefix")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = to_prompt_embeddings(kv.detach().float().cpu())  # [P, L*2*Hkv*hd]
    config = peft_adapter_config(spec, int(kv.shape[3]), mid_dim, base_model_name_or_path)
    tmp_weights = folder / f".adapter_model.safetensors.tmp{os.getpid()}"
    save_file({"prompt_embeddings": weights}, str(tmp_weights), metadata={"format": "pt"})
    os.replace(tmp_weights, folder / "adapter_model.safetensors")
    tmp_config = folder / f".adapter_config.json.tmp{os.getpid()}"
    tmp_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp_config, folder / "adapter_config.json")
    return folder
