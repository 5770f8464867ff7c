"""HF PEFT prefix-tuning files, read and written (docs/peft-prefix-format.md).

Two layouts of the same numbers:

    PEFT's prompt_embeddings   [P, L * 2 * Hkv * hd]   (an adapter folder's one tensor)
    prefix-serve's prefix_kv   [L, 2, Hkv, P, hd]      (0 = key, 1 = value)

    kv = W.view(P, L, 2, Hkv, hd).permute(1, 2, 3, 0, 4)

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors`. A pickle
(`adapter_model.bin`) is never read. PEFT writes the final prefix even when it was trained
with the MLP reparameterization, so there is never an MLP to run. For GQA models PEFT sizes
the prefix with the kv heads: token_dim = num_kv_heads * head_dim.

A SEQ_CLS adapter (BERT) also holds the classifier head PEFT trains as modules_to_save:
`base_model.classifier.weight` [num_labels, hidden] and `base_model.classifier.bias`;
`read_seq_cls_adapter` returns both with the prefix.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from server.prefix.model_spec import ModelKind, ModelSpec
from server.prefix.prefix import PrefixError, validate_kv

PEFT_VERSION = "0.21.2"  # the layout written, checked against this version
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_WEIGHTS_FILE = "adapter_model.bin"


class ModelMismatchError(PrefixError):
    """The prefix was made for another base model (its fingerprint or its width differ)."""


# ---- the two layouts

def kv_from_prompt_embeddings(w: torch.Tensor, spec: ModelSpec, num_virtual_tokens: int | None = None) -> torch.Tensor:
    """PEFT's `prompt_embeddings` [P, L*2*Hkv*hd] -> kv [L, 2, Hkv, P, hd] (a copy)."""
    if w.dim() != 2:
        raise PrefixError(f"prompt_embeddings has {w.dim()} dims {tuple(w.shape)}; expected 2: "
                          f"[num_virtual_tokens, {spec.num_layers * 2 * spec.peft_token_dim()}]")
    p, width = w.shape
    if num_virtual_tokens is not None and p != num_virtual_tokens:
        raise PrefixError(f"prompt_embeddings has {p} rows, num_virtual_tokens says {num_virtual_tokens}")
    expected = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim
    if width != expected:
        raise ModelMismatchError(
            f"prompt_embeddings rows have {width} values; the model needs num_layers({spec.num_layers})"
            f" * 2 * num_kv_heads({spec.num_kv_heads}) * head_dim({spec.head_dim}) = {expected}")
    kv = w.view(p, spec.num_layers, 2, spec.num_kv_heads, spec.head_dim).permute(1, 2, 3, 0, 4)
    return kv.contiguous()


def prompt_embeddings_from_kv(kv: torch.Tensor) -> torch.Tensor:
    """kv [L, 2, Hkv, P, hd] -> PEFT's `prompt_embeddings` [P, L*2*Hkv*hd]."""
    layers, _, heads, p, hd = kv.shape
    return kv.permute(3, 0, 1, 2, 4).reshape(p, layers * 2 * heads * hd).contiguous()


def kv_from_tensors(tensors: dict[str, torch.Tensor], spec: ModelSpec, num_virtual_tokens: int | None = None,
                    metadata: dict[str, str] | None = None) -> torch.Tensor:
    """kv from the tensors of a safetensors file: `prefix_kv`, or PEFT's `prompt_embeddings`.
    A `model_fingerprint` in the file's metadata must be the model's."""
    fingerprint = (metadata or {}).get("model_fingerprint")
    if fingerprint and fingerprint != spec.fingerprint:
        raise ModelMismatchError(f"the prefix was made for base model fingerprint {fingerprint}; this model is "
                                 f"{spec.fingerprint}: train it again on this model")
    if "prefix_kv" in tensors:
        return tensors["prefix_kv"]
    if "prompt_embeddings" in tensors:
        return kv_from_prompt_embeddings(tensors["prompt_embeddings"], spec, num_virtual_tokens)
    raise PrefixError(f"the safetensors file has neither 'prefix_kv' nor 'prompt_embeddings' (it has "
                      f"{sorted(tensors)[:10]})")


# ---- adapter_config.json

def check_adapter_config(config: dict, spec: ModelSpec, kind: ModelKind | None = None) -> None:
    """Raise PrefixError (ModelMismatchError for another model) unless `config` is a PEFT
    PREFIX_TUNING config that this model can serve. `kind` (default: the spec's) picks the
    task_type that fits: CAUSAL_LM (or none) for a causal LM, SEQ_CLS for a classifier."""
    kind = ModelKind(kind or spec.kind)
    if config.get("peft_type") != "PREFIX_TUNING":
        raise PrefixError(f"adapter peft_type is {str(config.get('peft_type'))[:40]!r}; expected 'PREFIX_TUNING'")
    task_type = config.get("task_type")
    if kind is ModelKind.CAUSAL_LM:
        if task_type not in (None, "CAUSAL_LM"):
            raise PrefixError(f"adapter task_type is {str(task_type)[:40]!r}; expected 'CAUSAL_LM' "
                              f"for this {kind.value} model")
    elif task_type != kind.peft_task_type:
        raise PrefixError(f"adapter task_type is {str(task_type)[:40]!r}; this {kind.value} model needs "
                          f"{kind.peft_task_type!r}")
    submodules = 2 if kind is ModelKind.SEQ2SEQ_LM else 1
    if config.get("num_transformer_submodules", submodules) != submodules:
        what = "decoder-only models" if kind is ModelKind.CAUSAL_LM else f"{kind.value} models"
        raise PrefixError("adapter has num_transformer_submodules "
                          f"{config.get('num_transformer_submodules')}; {what} need {submodules}")
    if config.get("num_layers") not in (None, spec.num_layers):
        raise ModelMismatchError(f"adapter has num_layers {config['num_layers']}, model has {spec.num_layers}")
    token_dim = config.get("token_dim")
    if token_dim is not None and token_dim != spec.peft_token_dim():
        raise ModelMismatchError(f"adapter token_dim is {token_dim}; this model needs num_kv_heads({spec.num_kv_heads})"
                                 f" * head_dim({spec.head_dim}) = {spec.peft_token_dim()}: it was made for "
                                 "another base model")
    nvt = config.get("num_virtual_tokens")
    if nvt is not None and (isinstance(nvt, bool) or not isinstance(nvt, int) or nvt < 1):
        raise PrefixError(f"adapter num_virtual_tokens is {str(nvt)[:40]!r}; expected a positive integer")


def adapter_config(spec: ModelSpec, num_virtual_tokens: int, mid_dim: int,
                   base_model_name_or_path: str | None = None) -> dict:
    """What `get_peft_model(model, PrefixTuningConfig(prefix_projection=True)).save_pretrained()`
    writes (peft 0.21.2); for a seq2seq_lm spec, with task_type SEQ_2_SEQ_LM (two transformer
    submodules; PEFT's num_layers, heads and token_dim are the encoder's, which PrefixSeq2Seq
    requires to equal the decoder's)."""
    seq2seq = spec.kind is ModelKind.SEQ2SEQ_LM
    return {
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "encoder_hidden_size": mid_dim,
        "inference_mode": True,
        "init_weights": None,
        "modules_to_save": None,
        "num_attention_heads": spec.num_kv_heads,
        "num_layers": spec.num_layers,
        "num_transformer_submodules": 2 if seq2seq else 1,
        "num_virtual_tokens": num_virtual_tokens,
        "peft_type": "PREFIX_TUNING",
        "peft_version": PEFT_VERSION,
        "prefix_projection": True,
        "revision": None,
        "task_type": "SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM",
        "token_dim": spec.peft_token_dim(),
    }


# ---- files on disk

def _read_folder(folder: Path, spec: ModelSpec, kind: ModelKind | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config, tensors) of a PEFT PREFIX_TUNING adapter folder (safetensors only),
    the config checked and `prompt_embeddings` present."""
    from safetensors.torch import load_file

    if not (folder / CONFIG_FILE).exists():
        raise PrefixError(f"{folder} has no {CONFIG_FILE}")
    weights = folder / WEIGHTS_FILE
    if not weights.exists():
        hint = (f" ({PICKLED_WEIGHTS_FILE} is a pickle and is refused; save with safe_serialization)"
                if (folder / PICKLED_WEIGHTS_FILE).exists() else "")
        raise PrefixError(f"{folder} has no {WEIGHTS_FILE}{hint}")
    config = json.loads((folder / CONFIG_FILE).read_text())
    check_adapter_config(config, spec, kind)
    tensors = load_file(weights)
    if "prompt_embeddings" not in tensors:
        raise PrefixError(f"{WEIGHTS_FILE} has no 'prompt_embeddings' tensor (has {sorted(tensors)})")
    return config, tensors


def read_adapter(folder: str | Path, spec: ModelSpec) -> torch.Tensor:
    """kv from a PEFT PREFIX_TUNING adapter folder (safetensors only)."""
    config, tensors = _read_folder(Path(folder), spec)
    return kv_from_prompt_embeddings(tensors["prompt_embeddings"], spec, config.get("num_virtual_tokens"))


# ---- SEQ_CLS adapters: a prefix and the classifier head (PEFT's modules_to_save)

HEAD_WEIGHT = "base_model.classifier.weight"  # what PEFT 0.21.2 writes for BERT's `classifier`
HEAD_BIAS = "base_model.classifier.bias"
LABELS_FILE = "config.json"  # a base model config saved beside the adapter, read for id2label only


@dataclass(frozen=True, eq=False)
class SeqClsAdapter:
    """A PEFT SEQ_CLS prefix adapter: the prefix and, when it was saved, its classifier head."""

    kv: torch.Tensor  # [L, 2, Hkv, P, hd]
    head_weight: torch.Tensor | None  # [num_labels, hidden]; None: use the base model's head
    head_bias: torch.Tensor | None  # [num_labels]
    labels: tuple[str, ...] | None  # label names by index, from id2label when the folder has them

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.kv.shape[3])


def read_seq_cls_adapter(folder: str | Path, spec: ModelSpec, hidden_size: int | None = None) -> SeqClsAdapter:
    """A PEFT SEQ_CLS PREFIX_TUNING adapter folder (safetensors only): the prefix, the
    classifier head PEFT saved as modules_to_save (weight [num_labels, hidden] and bias), and
    label names from a `config.json` beside it that has id2label. `hidden_size` (default
    num_kv_heads * head_dim) is the width the head must read."""
    folder = Path(folder)
    config, tensors = _read_folder(folder, spec, ModelKind.SEQ_CLS)
    kv = kv_from_prompt_embeddings(tensors["prompt_embeddings"], spec, config.get("num_virtual_tokens"))
    weight, bias = seq_cls_head(tensors, hidden_size or spec.peft_token_dim())
    path = folder / LABELS_FILE
    labels = None
    if path.exists():
        labels = labels_of_config(json.loads(path.read_text()), None if weight is None else int(weight.shape[0]))
    return SeqClsAdapter(kv=kv, head_weight=weight, head_bias=bias, labels=labels)


def seq_cls_head(tensors: dict[str, torch.Tensor], hidden_size: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The (weight, bias) of the classifier head a SEQ_CLS adapter's weights hold, checked, or
    (None, None) when it holds none; refuses any other tensor."""
    unknown = sorted(set(tensors) - {"prompt_embeddings", HEAD_WEIGHT, HEAD_BIAS})
    if unknown:
        raise PrefixError(f"{WEIGHTS_FILE} has tensors prefix-serve cannot serve: {unknown[:10]}; a BERT SEQ_CLS "
                          f"adapter holds 'prompt_embeddings', {HEAD_WEIGHT!r} and {HEAD_BIAS!r}")
    weight, bias = tensors.get(HEAD_WEIGHT), tensors.get(HEAD_BIAS)
    if (weight is None) != (bias is None):
        raise PrefixError(f"{WEIGHTS_FILE} has {HEAD_WEIGHT if weight is not None else HEAD_BIAS!r} "
                          f"but not {HEAD_BIAS if weight is not None else HEAD_WEIGHT!r}")
    if weight is not None:
        check_head(weight, bias, hidden_size)
    return weight, bias


def check_head(weight: torch.Tensor, bias: torch.Tensor, hidden_size: int) -> None:
    """Raise ModelMismatchError unless weight is [num_labels, hidden_size] and bias [num_labels]."""
    if weight.dim() != 2 or weight.shape[1] != hidden_size:
        raise ModelMismatchError(f"classifier weight has shape {tuple(weight.shape)}; this model needs "
                                 f"[num_labels, hidden_size={hidden_size}]: it was made for another base model")
    if tuple(bias.shape) != (weight.shape[0],):
        raise ModelMismatchError(f"classifier bias has shape {tuple(bias.shape)}; the weight has "
                                 f"{weight.shape[0]} labels")
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise PrefixError("the classifier head has non-finite values (NaN or inf)")


def labels_of_config(config: dict, num_labels: int | None) -> tuple[str, ...] | None:
    """Label names by index from a model config's id2label (a `config.json` saved beside the
    adapter), or None when it names none."""
    id2label = config.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        return None
    try:
        by_index = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError):
        raise PrefixError(f"{LABELS_FILE} id2label keys must be integers, got {sorted(id2label)[:5]}") from None
    n = len(by_index)
    if sorted(by_index) != list(range(n)):
        raise PrefixError(f"{LABELS_FILE} id2label has indices {sorted(by_index)[:10]}; expected 0..{n - 1}")
    if num_labels is not None and n != num_labels:
        raise PrefixError(f"{LABELS_FILE} id2label names {n} labels; the classifier head has {num_labels}")
    return tuple(by_index[i] for i in range(n))


def read_prefix_path(path: str | Path, spec: ModelSpec, num_virtual_tokens: int | None = None) -> torch.Tensor:
    """kv from a PEFT adapter folder, or a .safetensors file holding `prefix_kv` or
    `prompt_embeddings` (pickle files are refused)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        return read_adapter(path, spec)
    if path.suffix != ".safetensors":
        raise PrefixError(f"{path.name}: expected a PEFT adapter folder or a .safetensors file "
                          "(pickle files such as .bin or .pt are refused)")
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    return kv_from_tensors(load_file(path), spec, num_virtual_tokens, metadata)


def write_adapter(kv: torch.Tensor, folder: str | Path, spec: ModelSpec, mid_dim: int = 512,
                  base_model_name_or_path: str | None = None) -> Path:
    """Write kv [L, 2, Hkv, P, hd] as a PEFT adapter folder (created); returns the folder.
    `PeftModel.from_pretrained(base, folder)` loads it. Each file is written under a
    temporary name and renamed, so a reader never sees a half-written tensor."""
    from safetensors.torch import save_file

    validate_kv(kv, spec, "trained prefix")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = prompt_embeddings_from_kv(kv.detach().float().cpu())  # [P, L*2*Hkv*hd]
    config = adapter_config(spec, int(kv.shape[3]), mid_dim, base_model_name_or_path)
    tmp_weights = folder / f".{WEIGHTS_FILE}.tmp{os.getpid()}"
    save_file({"prompt_embeddings": weights}, str(tmp_weights), metadata={"format": "pt"})
    os.replace(tmp_weights, folder / WEIGHTS_FILE)
    tmp_config = folder / f".{CONFIG_FILE}.tmp{os.getpid()}"
    tmp_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp_config, folder / CONFIG_FILE)
    return folder
