"""Prefix uploads: the accepted formats, every refused one (4xx naming the problem, the
store unchanged), size limits, and replacing a prefix under the same id."""

from __future__ import annotations

import io
import json
import struct
import time
import zipfile

import pytest
import torch
from safetensors.torch import save
from transformers import LlamaForCausalLM

from server.prefix.peft_format import prompt_embeddings_from_kv
from tests.api.harness import make_adapter, peft_greedy, upload
from tests.factories import hf_greedy, tiny_llama


@pytest.fixture(scope="module")
def spec(stack):
    return stack.engine.engine.spec


@pytest.fixture(scope="module")
def good_kv(spec) -> torch.Tensor:
    return torch.randn(spec.kv_shape(4), generator=torch.Generator().manual_seed(3))


def zip_of(entries: dict[str, bytes], symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (0o120777 << 16)  # S_IFLNK
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def adapter_entries(adapter) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(adapter.zip_bytes)) as zf:
        return {n.split("/", 1)[1]: zf.read(n) for n in zf.namelist()}


def with_declared_size(zip_bytes: bytes, size: int) -> bytes:
    """The same zip, its central directory claiming `size` uncompressed bytes per entry."""
    data = bytearray(zip_bytes)
    at = data.find(b"PK\x01\x02")
    while at >= 0:
        struct.pack_into("<I", data, at + 24, size)
        at = data.find(b"PK\x01\x02", at + 4)
    return bytes(data)


def safetensors_with_header(header: bytes, body: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + body


def pickle_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save({"prompt_embeddings": torch.zeros(2, 2)}, buf)
    return buf.getvalue()


def bad_cases(spec, good_kv, adapter, wrong_model_adapter) -> dict[str, tuple]:
    """name -> (filename, bytes, form, expected status, words the message must contain)."""
    entries = adapter_entries(adapter)
    big = torch.zeros(spec.kv_shape(200))  # 200 tokens * 512 B > max_prefix_bytes (64 KiB)
    nan = good_kv.clone()
    nan[0, 1, 0, 2, 3] = float("nan")
    wrong_hd = torch.zeros(spec.num_layers, 2, spec.num_kv_heads, 4, spec.head_dim + 1)
    return {
        "wrong shape": ("p.safetensors", save({"prefix_kv": wrong_hd}), {}, 422, ["head_dim"]),
        "wrong base model (layers)": ("a.zip", wrong_model_adapter.zip_bytes, {}, 422, ["num_layers 3", "2"]),
        "wrong base model (fingerprint)": ("p.safetensors",
                                           save({"prefix_kv": good_kv}, metadata={"model_fingerprint": "0123abcd"}),
                                           {}, 422, ["fingerprint 0123abcd"]),
        "NaN": ("p.safetensors", save({"prefix_kv": nan}), {}, 422, ["1 non-finite"]),
        "pickle .bin file": ("adapter_model.bin", pickle_bytes(), {}, 415, ["pickle"]),
        "torch.save archive named .zip": ("adapter.zip", pickle_bytes(), {}, 415, ["pickle"]),
        "pickle .bin in the zip": ("a.zip", zip_of({"adapter_config.json": entries["adapter_config.json"],
                                                    "adapter_model.bin": pickle_bytes()}), {}, 415,
                                   ["adapter_model.bin", "pickle"]),
        "oversized tensor": ("p.safetensors", save({"prefix_kv": big}), {}, 413, ["limit is 65536"]),
        "zip with ..": ("a.zip", zip_of({"../adapter_config.json": entries["adapter_config.json"],
                                         "adapter_model.safetensors": entries["adapter_model.safetensors"]}),
                        {}, 400, ["'..'"]),
        "zip with absolute path": ("a.zip", zip_of({"/etc/adapter_config.json": b"{}"}), {}, 400, ["absolute"]),
        "zip with symlink": ("a.zip", zip_of(entries, symlink="adapter_model.safetensors.link"), {}, 400,
                             ["symbolic link"]),
        "zip with huge declared size": ("a.zip", with_declared_size(zip_of(entries), 0xFFFFFFF0), {}, 413,
                                        ["declares 4294967280 bytes"]),
        "zip with too many entries": ("a.zip", zip_of({f"f{i}.txt": b"x" for i in range(100)}), {}, 400,
                                      ["100 entries"]),
        "zip without safetensors": ("a.zip", zip_of({"adapter_config.json": entries["adapter_config.json"]}),
                                    {}, 400, ["no adapter_model.safetensors"]),
        "safetensors header too large": ("p.safetensors", struct.pack("<Q", 1 << 40) + b"{}", {}, 400,
                                         ["header of 1099511627776 bytes"]),
        "safetensors header not JSON": ("p.safetensors", safetensors_with_header(b"{nope" + b" " * 11), {}, 400,
                                        ["not JSON"]),
        "safetensors offsets outside the file": (
            "p.safetensors", safetensors_with_header(json.dumps(
                {"prefix_kv": {"dtype": "F32", "shape": [1, 2, 2, 4, 16], "data_offsets": [0, 1024]}}).encode(),
                b"\0" * 16), {}, 400, ["data_offsets", "16 data bytes"]),
        "not a prefix file": ("notes.txt", b"hello, I am not a tensor file at all", {}, 400, ["safetensors"]),
        "no known tensor": ("p.safetensors", save({"weights": good_kv}), {}, 422, ["prefix_kv", "weights"]),
        "num_virtual_tokens disagrees": ("p.safetensors",
                                         save({"prompt_embeddings": prompt_embeddings_from_kv(good_kv)}),
                                         {"num_virtual_tokens": 5}, 422, ["4 rows", "num_virtual_tokens says 5"]),
    }


def test_bad_uploads_are_refused_and_change_nothing(stack, tenant_key, uploader, spec, good_kv, vocab):
    adapter = make_adapter(vocab, 4, seed=11)
    wrong_model_adapter = _three_layer_adapter(vocab)
    assert uploader(tenant_key, "keep", adapter.zip_bytes).status_code in (200, 201)
    before = stack.store.list("acme")
    failures = []
    for name, (filename, data, form, status, words) in bad_cases(spec, good_kv, adapter, wrong_model_adapter).items():
        for prefix_id in ("keep", "fresh"):  # neither replaces an existing prefix nor creates one
            r = uploader(tenant_key, prefix_id, data, filename, **form)
            message = r.json().get("error", {}).get("message", "") if r.headers.get("content-type", "").startswith(
                "application/json") else r.text
            if r.status_code != status or not all(w in message for w in words):
                failures.append(f"{name} ({prefix_id}): {r.status_code} {message!r}")
    assert not failures, "\n".join(failures)
    assert stack.store.list("acme") == before


def _three_layer_adapter(vocab: int):
    """A PEFT adapter made for a 3-layer model: another base model than the served one."""
    cfg = tiny_llama(0, vocab).config
    cfg.num_hidden_layers = 3
    return make_adapter(vocab, 4, seed=13, base=LlamaForCausalLM(cfg).eval())


def test_invalid_ids_and_forms_are_refused(stack, tenant_key, uploader, good_kv):
    data = save({"prefix_kv": good_kv})
    before = stack.store.list("acme")
    for bad_id in ("bad id", ".hidden", "x" * 200, "semi;colon"):
        r = uploader(tenant_key, bad_id, data, "p.safetensors")
        assert r.status_code == 400, (bad_id, r.text)
        assert "invalid prefix id" in r.json()["error"]["message"]
    with stack.client(tenant_key) as c:
        r = c.put("/v1/prefixes/nofile", files={"other": ("p.safetensors", data)})
        assert r.status_code == 400 and "'file'" in r.json()["error"]["message"]
        r = c.put("/v1/prefixes/raw", content=data)
        assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]["message"]
        r = upload(c, "nvt", data, "p.safetensors", num_virtual_tokens="four")
        assert r.status_code == 400 and "num_virtual_tokens" in r.json()["error"]["message"]
    assert stack.store.list("acme") == before


def test_body_over_the_upload_limit_is_refused_before_it_is_read(stack, tenant_key):
    limit = stack.settings.max_upload_bytes
    with stack.client(tenant_key) as c:
        r = upload(c, "huge", b"\0" * (limit + 1000), "p.safetensors")
        assert r.status_code == 413
        assert f"at most {limit} (max_upload_bytes)" in r.json()["error"]["message"]
        # without a Content-Length (chunked), the limit holds while reading
        def chunks():
            for _ in range(8):
                yield b"x" * (limit // 4)
        r = c.post("/v1/generate", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]
    assert stack.store.get_record("acme", "huge") is None


def test_safetensors_uploads_prefix_kv_and_prompt_embeddings(stack, tenant_key, uploader, spec, good_kv, tokenizer):
    r = uploader(tenant_key, "kv-file", save({"prefix_kv": good_kv}), "p.safetensors", description="raw kv")
    assert r.status_code == 201 and r.json()["description"] == "raw kv" and r.json()["num_virtual_tokens"] == 4
    r2 = uploader(tenant_key, "emb-file", save({"prompt_embeddings": prompt_embeddings_from_kv(good_kv)}),
                  "p.safetensors", num_virtual_tokens=4)
    assert r2.status_code == 201
    assert r2.json()["version"] == r.json()["version"]  # same tensor, same content hash
    ids = tokenizer("hello world")["input_ids"]
    want = hf_greedy(tiny_llama(0, len(tokenizer)), good_kv, ids, 6)
    with stack.client(tenant_key) as c:
        for pid in ("kv-file", "emb-file"):
            got = c.post("/v1/generate", json={"prefix_id": pid, "prompt": "hello world", "max_tokens": 6}).json()
            assert got["token_ids"] == want


def test_replace_serves_the_new_tensor_to_the_next_request(stack, tenant_key, uploader, vocab, tokenizer):
    old, new = make_adapter(vocab, 5, seed=21), make_adapter(vocab, 5, seed=22)
    prompt = "the quick brown fox"
    ids = tokenizer(prompt)["input_ids"]
    want_old, want_new = peft_greedy(old, ids, 8), peft_greedy(new, ids, 8)
    assert want_old != want_new
    first = uploader(tenant_key, "rotating", old.zip_bytes)
    assert first.status_code == 201
    body = {"prefix_id": "rotating", "prompt": prompt, "max_tokens": 8}
    with stack.client(tenant_key) as c:
        # twice: now resident in host memory and in the KV pool
        assert c.post("/v1/generate", json=body).json()["token_ids"] == want_old
        assert c.post("/v1/generate", json=body).json()["token_ids"] == want_old
        second = uploader(tenant_key, "rotating", new.zip_bytes)
        assert second.status_code == 200 and second.json()["version"] != first.json()["version"]
        after = c.post("/v1/generate", json=body).json()
    assert after["token_ids"] == want_new
    assert after["prefix"] == [{"id": "rotating", "version": second.json()["version"]}]
    # and the store event dropped the old version from host memory
    old_version = first.json()["version"]
    wait_until(lambda: all(r.version != old_version for key in stack.ctx.resolver.cache._entries for r in key))


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)
