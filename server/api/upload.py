"""Parsing and checking an uploaded prefix, in memory, trusting nothing in it.

Accepted (docs/api.md): a zip of a HF PEFT prefix-tuning adapter folder, or a safetensors file
holding `prompt_embeddings` [P, L*2*Hkv*hd] or `prefix_kv` [L, 2, Hkv, P, hd], the latter, for
a seq2seq model, with the three-prefix form's optional `encoder_kv` and `cross_kv` parts
[L, 2, Hkv, P_part, hd] (the file `prefix-serve train` writes).

Refused with a message naming the problem: pickle files (`adapter_model.bin`, torch.save
archives), zip entries with `..`, absolute paths or symlinks, too many zip entries, a
declared uncompressed size over the limit, a safetensors header that is too large, not
JSON, or whose offsets do not fit the file, and any tensor the loaded model cannot use
(`validate_kv`: shape, dtype, non-finite values) or that was made for another base model.
Nothing is extracted to disk. The formats themselves are read by server/prefix/peft_format.py;
this module adds what a file from a stranger needs before that.
"""

from __future__ import annotations

import io
import json
import posixpath
import stat
import struct
import zipfile

from dataclasses import dataclass

import torch

from server.prefix import ClassifierHead, ModelKind, ModelMismatchError, ModelSpec, PrefixError, shorten, validate_kv
from server.prefix.peft_format import (CONFIG_FILE, LABELS_FILE, PICKLED_WEIGHTS_FILE, WEIGHTS_FILE,
                                       check_adapter_config, kv_from_tensors, labels_of_config, seq_cls_head)

MAX_HEADER_BYTES = 1 << 20  # a prefix file holds a few tensors; its header is a few hundred bytes
MAX_ZIP_ENTRIES = 64
MAX_CONFIG_BYTES = 1 << 20
_SAFETENSORS_DTYPES = {  # safetensors dtype name -> bytes per element
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class UploadError(ValueError):
    """An upload we refuse. `status` is the HTTP status it maps to."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_upload"):
        super().__init__(message)
        self.status = status
        self.kind = kind


@dataclass(frozen=True, eq=False)
class ParsedUpload:
    kv: torch.Tensor  # [L, 2, Hkv, P, hd], checked, its dtype as uploaded
    head: ClassifierHead | None = None  # a SEQ_CLS adapter's own classifier head
    encoder_kv: torch.Tensor | None = None  # a seq2seq prefix's encoder self-attention part, checked
    cross_kv: torch.Tensor | None = None  # a seq2seq prefix's cross-attention part, checked


def parse_prefix_upload(data: bytes, spec: ModelSpec, *, filename: str | None = None,
                        num_virtual_tokens: int | None = None, max_prefix_bytes: int) -> ParsedUpload:
    """The checked prefix of an uploaded file (and, for a SEQ_CLS adapter zip, its head; for a
    seq2seq prefix file, its encoder and cross parts), or UploadError."""
    name = (filename or "").lower()
    if name.endswith(_PICKLE_SUFFIXES) or _looks_like_pickle(data):
        raise UploadError(f"{shorten(filename or 'the file')} is a pickle (PyTorch .bin/.pt) file; pickles can run "
                          "code and are refused: save the adapter with safetensors "
                          "(save_pretrained(..., safe_serialization=True))", 415, "unsupported_format")
    head, parts = None, {}
    if data[:4] == b"PK\x03\x04" or data[:4] == b"PK\x05\x06":
        kv, head = _parse_adapter_zip(data, spec, max_prefix_bytes)
    else:
        tensors, metadata = read_safetensors(data, max_prefix_bytes, what=shorten(filename or "the file"))
        kv = _as_upload_error(kv_from_tensors, tensors, spec, num_virtual_tokens, metadata)
        parts = {name: tensors[name] for name in PART_NAMES if name in tensors}
    _as_upload_error(validate_kv, kv, spec)
    for name, part in parts.items():
        _check_part(name, part, kv, spec)
    nbytes = sum(t.numel() * t.element_size() for t in (kv, *parts.values()))
    if nbytes > max_prefix_bytes:
        raise UploadError(f"the prefix has {nbytes} bytes; the limit is {max_prefix_bytes}", 413, "payload_too_large")
    return ParsedUpload(kv.contiguous(), head, **{name: part.contiguous() for name, part in parts.items()})


PART_NAMES = ("encoder_kv", "cross_kv")  # the three-prefix form's other parts (docs/peft-prefix-format.md)


def _check_part(name: str, part: torch.Tensor, kv: torch.Tensor, spec: ModelSpec) -> None:
    """A seq2seq prefix's encoder or cross part: only for a seq2seq model, in the model's
    layout (its own length) and the dtype of `prefix_kv`."""
    if spec.kind is not ModelKind.SEQ2SEQ_LM:
        raise UploadError(f"the file holds {name} {list(part.shape)}, a part of the three-prefix form of an "
                          f"encoder-decoder model; this server runs a {spec.kind.value} model, which takes only "
                          "prefix_kv (or prompt_embeddings)", 422, "invalid_prefix")
    _as_upload_error(validate_kv, part, spec, f"prefix {name}")
    if part.dtype != kv.dtype:
        raise UploadError(f"{name} is {str(part.dtype).removeprefix('torch.')} but prefix_kv is "
                          f"{str(kv.dtype).removeprefix('torch.')}: the parts of one prefix need one dtype",
                          422, "invalid_prefix")


def _as_upload_error(fn, *args, kind: str = "invalid_prefix"):
    """fn(*args), with the prefix domain's errors as 422 UploadErrors."""
    try:
        return fn(*args)
    except ModelMismatchError as e:
        raise UploadError(str(e), 422, "model_mismatch") from e
    except PrefixError as e:
        raise UploadError(str(e), 422, kind) from e


def _looks_like_pickle(data: bytes) -> bool:
    # Pickle protocol 2+ opens with PROTO (0x80); torch.save's zip holds a data.pkl. A
    # safetensors header length may also start with 0x80, but its JSON header follows at 8.
    if data[:1] == b"\x80" and data[8:9] != b"{":
        return True
    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                return any(i.filename.endswith("data.pkl") for i in zf.infolist()[:MAX_ZIP_ENTRIES])
        except zipfile.BadZipFile:
            return False
    return False


# --- safetensors, header checked by hand before the library sees it

def read_safetensors(data: bytes, max_prefix_bytes: int, what: str = "the file"
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and `__metadata__` of a safetensors blob whose header has been checked."""
    if len(data) < 8:
        raise UploadError(f"{what} is {len(data)} bytes: too short to be safetensors (a zip of a PEFT "
                          "adapter folder or a .safetensors file is expected)", 400, "malformed_safetensors")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES or header_len > len(data) - 8:
        raise UploadError(f"{what} declares a safetensors header of {header_len} bytes; the file has "
                          f"{len(data) - 8} after the length and headers are limited to {MAX_HEADER_BYTES}: "
                          "not a valid safetensors file", 400, "malformed_safetensors")
    try:
        header = json.loads(data[8:8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UploadError(f"{what} has a safetensors header that is not JSON ({e})", 400,
                          "malformed_safetensors") from e
    if not isinstance(header, dict):
        raise UploadError(f"{what} has a safetensors header that is not a JSON object", 400, "malformed_safetensors")
    body = len(data) - 8 - header_len
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise UploadError(f"{what}: __metadata__ must be an object of strings", 400, "malformed_safetensors")
    total = 0
    for name, entry in header.items():
        total += _check_entry(name, entry, body, what)
    if total > max_prefix_bytes:
        raise UploadError(f"{what} holds {total} bytes of tensors; the limit is {max_prefix_bytes}",
                          413, "payload_too_large")
    from safetensors.torch import load

    try:
        tensors = load(data)
    except Exception as e:  # the library's own checks, after ours
        raise UploadError(f"{what} is not a valid safetensors file: {e}", 400, "malformed_safetensors") from e
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _check_entry(name: str, entry: object, body: int, what: str) -> int:
    bad = f"{what}: tensor {shorten(name)} has a malformed header entry"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise UploadError(f"{bad} (needs dtype, shape, data_offsets)", 400, "malformed_safetensors")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _SAFETENSORS_DTYPES:
        raise UploadError(f"{bad}: unknown dtype {shorten(dtype)}", 400, "malformed_safetensors")
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(isinstance(d, int) and 0 <= d < 1 << 40 for d in shape)):
        raise UploadError(f"{bad}: shape {shorten(shape)}", 400, "malformed_safetensors")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets) or not 0 <= offsets[0] <= offsets[1] <= body):
        raise UploadError(f"{bad}: data_offsets {shorten(offsets)} do not fit the {body} data bytes",
                          400, "malformed_safetensors")
    numel = 1
    for d in shape:
        numel *= d
    size = numel * _SAFETENSORS_DTYPES[dtype]
    if offsets[1] - offsets[0] != size:
        raise UploadError(f"{bad}: shape {shape} of {dtype} needs {size} bytes, the offsets give "
                          f"{offsets[1] - offsets[0]}", 400, "malformed_safetensors")
    return size


# --- zip of a PEFT adapter folder

def _parse_adapter_zip(data: bytes, spec: ModelSpec, max_prefix_bytes: int
                       ) -> tuple[torch.Tensor, ClassifierHead | None]:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as e:
        raise UploadError(f"the upload is not a valid zip file ({e})", 400, "malformed_zip") from e
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_ZIP_ENTRIES:
            raise UploadError(f"the zip has {len(infos)} entries; at most {MAX_ZIP_ENTRIES} are accepted "
                              "(an adapter folder has 2)", 400, "malformed_zip")
        for info in infos:
            _check_zip_entry(info, max_prefix_bytes)
        files = {i.filename: i for i in infos if not i.is_dir()}
        configs = [n for n in files if posixpath.basename(n) == CONFIG_FILE]
        if len(configs) != 1:
            raise UploadError(f"the zip must hold exactly one {CONFIG_FILE}, it holds {len(configs)} "
                              f"(entries: {[shorten(n, 60) for n in sorted(files)[:10]]})", 400, "invalid_adapter")
        folder = posixpath.dirname(configs[0])
        weights = posixpath.join(folder, WEIGHTS_FILE)
        if weights not in files:
            if posixpath.join(folder, PICKLED_WEIGHTS_FILE) in files:
                raise UploadError(f"the adapter holds {PICKLED_WEIGHTS_FILE}, a pickle, which is refused: save it "
                                  "with safetensors (save_pretrained(..., safe_serialization=True))",
                                  415, "unsupported_format")
            raise UploadError(f"the zip has no {WEIGHTS_FILE} next to {shorten(configs[0])}", 400,
                              "invalid_adapter")
        config = _read_config(zf, files[configs[0]])
        blob = _read_member(zf, files[weights], max_prefix_bytes + MAX_HEADER_BYTES + 8)
        labels_file = posixpath.join(folder, LABELS_FILE)
        model_config = _read_config(zf, files[labels_file]) if labels_file in files else None
    _as_upload_error(check_adapter_config, config, spec, kind="invalid_adapter")
    tensors, metadata = read_safetensors(blob, max_prefix_bytes, what=WEIGHTS_FILE)
    if "prompt_embeddings" not in tensors:
        raise UploadError(f"{WEIGHTS_FILE} has no 'prompt_embeddings' tensor (it has "
                          f"{[shorten(n, 60) for n in sorted(tensors)[:10]]}): is this a PREFIX_TUNING adapter?",
                          422, "invalid_adapter")
    kv = _as_upload_error(kv_from_tensors, {"prompt_embeddings": tensors["prompt_embeddings"]}, spec,
                          config.get("num_virtual_tokens"), metadata)
    if spec.kind is not ModelKind.SEQ_CLS:
        return kv, None
    # PEFT saves a SEQ_CLS adapter's trained head beside the prefix (modules_to_save), and
    # the label names in a config.json beside it when the base model's config was saved too.
    weight, bias = _as_upload_error(seq_cls_head, tensors, spec.peft_token_dim(), kind="invalid_adapter")
    if weight is None:
        return kv, None
    labels = (None if model_config is None else
              _as_upload_error(labels_of_config, model_config, int(weight.shape[0]), kind="invalid_adapter"))
    return kv, ClassifierHead(weight, bias, labels)


def _check_zip_entry(info: zipfile.ZipInfo, max_prefix_bytes: int) -> None:
    name = info.filename
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise UploadError(f"the zip entry {shorten(name)} has an absolute or '..' path; refused", 400, "unsafe_zip")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise UploadError(f"the zip entry {shorten(name)} is a symbolic link; refused", 400, "unsafe_zip")
    if info.file_size > max_prefix_bytes + MAX_HEADER_BYTES + 8:
        raise UploadError(f"the zip entry {shorten(name)} declares {info.file_size} bytes uncompressed; the limit "
                          f"is {max_prefix_bytes} (max_prefix_bytes)", 413, "payload_too_large")


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    # Read one byte past the limit so a lying size field cannot inflate past it.
    try:
        with zf.open(info) as f:
            blob = f.read(limit + 1)
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError, EOFError) as e:
        raise UploadError(f"the zip entry {shorten(info.filename)} cannot be read ({e})", 400, "malformed_zip") from e
    if len(blob) > limit:
        raise UploadError(f"the zip entry {shorten(info.filename)} inflates past {limit} bytes; refused",
                          413, "payload_too_large")
    return blob


def _read_config(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> dict:
    raw = _read_member(zf, info, MAX_CONFIG_BYTES)
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UploadError(f"{CONFIG_FILE} is not valid JSON ({e})", 400, "invalid_adapter") from e
    if not isinstance(config, dict):
        raise UploadError(f"{CONFIG_FILE} must be a JSON object", 400, "invalid_adapter")
    return config
