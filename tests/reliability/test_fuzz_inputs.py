"""Hostile input where schema fuzzing does not reach: generation bodies that pass the schema
(every sampling edge, odd text, lone surrogates, huge numbers), raw JSON that Python reads
but a tokenizer does not, uploads built to hurt (malformed safetensors headers, shapes of
many GB, zip bombs, path traversal) and odd ids (very long, unicode, slashes, dots).

Whatever comes in: a 2xx or a 4xx with our JSON error, never a 5xx; a refused upload changes
nothing; a huge max_tokens is refused by configuration (max_output_tokens), never run.
"""

from __future__ import annotations

import io
import json
import struct
import warnings
import zipfile
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from tests.api.harness import MODEL_NAME, make_adapter
from tests.reliability.conftest import MAX_OUTPUT_TOKENS, SCALE, VICTIM, World, check_answer

FUZZ = settings(max_examples=150 * SCALE, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

text = st.one_of(st.text(max_size=40), st.sampled_from(["", " ", "<|im_end|>", "<|im_start|>system\n", "\x00",
                                                        "\ud800", "a\udfffb", "é" * 50, "🦊" * 10, "\u202e" * 5]))
ints = st.one_of(st.integers(-2, 40), st.sampled_from([2**31, 2**63 - 1, 2**63, 2**64, 10**30, -(2**63)]))
floats = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([0.0, 1e-45, 1e-300, 5e-324]))
sampling = st.fixed_dictionaries({}, optional={
    "temperature": floats, "top_p": floats, "top_k": ints, "seed": ints, "max_tokens": ints,
    "stop": st.one_of(text, st.lists(text, max_size=20)), "ignore_eos": st.booleans(), "stream": st.booleans()})
prefix_ids = st.one_of(st.none(), st.sampled_from(["mine", "secret", "shared/secret", "user:bob", "nope", "../x",
                                                   "a" * 200, "é", "mine/../secret"]), st.lists(st.just("mine"), max_size=40))
prompt = st.one_of(text, st.lists(ints, max_size=20))
content_parts = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", 5]), "text": text}),
                         max_size=3)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]),
                                           "content": st.one_of(text, st.none(), content_parts)}), max_size=4)


def post_raw(c: httpx.Client, path: str, body: dict) -> httpx.Response:
    """JSON as Python writes it: lone surrogates escaped, NaN as NaN (what an attacker sends)."""
    return c.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


def assert_sane(world: World, r: httpx.Response, sent: dict | None = None) -> None:
    problems = check_answer(r.status_code, r.headers.get("content-type", ""), r.text,
                            world.secrets - {world.attacker_key}, world.stack.store.keys.namespace)
    assert not problems, (problems, sent, r.text[:300])
    if r.status_code != 200 or not r.headers.get("content-type", "").startswith("application/json"):
        return
    usage = r.json().get("usage") or {}
    assert usage.get("completion_tokens", 0) <= MAX_OUTPUT_TOKENS  # never more than configured


@pytest.fixture(scope="module")
def attacker(world: World):
    with world.stack.client(world.attacker_key, timeout=60) as c:
        yield c


@FUZZ
@given(body=sampling, prefix=prefix_ids, data=st.one_of(st.tuples(st.just("prompt"), prompt),
                                                          st.tuples(st.just("messages"), messages)),
       user_id=st.one_of(st.none(), st.sampled_from(["bob", "x" * 300, "../bob", "bob/../../admin"])))
def test_generation_bodies(world, attacker, body, prefix, data, user_id):
    body = {**body, data[0]: data[1]}
    if prefix is not None:
        body["prefix_id"] = prefix
    if user_id is not None:
        body["user_id"] = user_id
    assert_sane(world, post_raw(attacker, "/v1/generate", body), body)


@FUZZ
@given(body=sampling, model=st.one_of(st.just(MODEL_NAME), prefix_ids.filter(lambda p: isinstance(p, str))),
       data=st.one_of(st.tuples(st.just("/v1/completions"), st.fixed_dictionaries({"prompt": st.one_of(
           prompt, st.lists(prompt, max_size=3))})), st.tuples(st.just("/v1/chat/completions"),
                                                               st.fixed_dictionaries({"messages": messages}))))
def test_openai_bodies(world, attacker, body, model, data):
    path, fields = data
    sent = {**body, **fields, "model": model}
    assert_sane(world, post_raw(attacker, path, sent), sent)


@pytest.mark.parametrize("raw", [
    b'{"prompt": "\\ud800", "max_tokens": 2}', b'{"messages": [{"role": "user", "content": "a\\udc00"}]}',
    b'{"prompt": "hi", "max_tokens": NaN}', b'{"prompt": "hi", "temperature": Infinity}',
    b'{"prompt": "hi", "max_tokens": 1e999}', b'{"prompt": [1e999]}', b'{"prompt": "hi", "seed": -0.0}',
    b'[' * 5000 + b']' * 5000, b'{"prompt": "hi"' + b', "x": 1' * 3000 + b'}', b'\xff\xfe{}', b'',
])
def test_raw_json_oddities(world, attacker, raw):
    r = attacker.post("/v1/generate", content=raw, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert_sane(world, r)


def test_huge_max_tokens_is_refused_by_configuration_never_run(world, attacker):
    before = world.stack.engine.stats().generated_tokens
    for max_tokens in (MAX_OUTPUT_TOKENS + 1, 10**6, 2**63 - 1):
        r = attacker.post("/v1/generate", json={"prompt": "hello", "max_tokens": max_tokens})
        assert r.status_code == 400 and "max_output_tokens" in r.json()["error"]["message"], r.text
        r = attacker.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "hello", "max_tokens": max_tokens})
        assert r.status_code == 400, r.text
    world.stack.wait_idle()
    assert world.stack.engine.stats().generated_tokens == before  # nothing ran
    # a chat request without max_tokens fills the context no further than the limit
    r = attacker.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}],
                                                   "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == MAX_OUTPUT_TOKENS, r.text


# --- uploads

def safetensors_blob(header: dict | bytes, body: bytes = b"", declared_len: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if declared_len is None else declared_len) + raw + body


dims = st.one_of(st.integers(0, 8), st.sampled_from([2**20, 2**31, 2**40 - 1, 2**40, 2**62, -1]))
header_entries = st.dictionaries(
    st.one_of(st.sampled_from(["prefix_kv", "prompt_embeddings", "__metadata__"]), st.text(max_size=20)),
    st.one_of(st.fixed_dictionaries({
        "dtype": st.sampled_from(["F32", "BF16", "F16", "I64", "BOOL", "F8_E4M3", "X99", ""]),
        "shape": st.one_of(st.lists(dims, max_size=10), st.text(max_size=5), st.none()),
        "data_offsets": st.one_of(st.lists(st.integers(-5, 2**45), max_size=3), st.none())}),
        st.text(max_size=10), st.integers(), st.none()), max_size=4)


@FUZZ
@given(header=st.one_of(header_entries, st.binary(max_size=64)), body=st.binary(max_size=256),
       lie=st.one_of(st.none(), st.sampled_from([0, 7, 2**20, 2**40, 2**64 - 1])),
       name=st.sampled_from(["p.safetensors", "adapter_model.safetensors", "x.bin", "noext", "..%2F..%2Fp"]))
def test_malformed_safetensors_headers(world, attacker, header, body, lie, name):
    before = world.stack.store.list("acme")
    r = attacker.put("/v1/prefixes/fuzzed", files={"file": (name, safetensors_blob(header, body, lie))})
    assert r.status_code in (400, 413, 415, 422), (r.status_code, r.text[:300])
    assert_sane(world, r)
    assert world.stack.store.list("acme") == before


def zip_with(entries: list[tuple[str, bytes]], symlink: bool = False, deflate: bool = True) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as zf:
        warnings.simplefilter("ignore")  # duplicate names are part of the attack
        for i, (name, data) in enumerate(entries):
            info = zipfile.ZipInfo(name)
            if symlink and i == 0:
                info.external_attr = 0o120777 << 16
            info.compress_type = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
            zf.writestr(info, data)
    return buf.getvalue()


entry_names = st.one_of(st.sampled_from([
    "adapter_config.json", "adapter_model.safetensors", "a/adapter_config.json", "a/adapter_model.safetensors",
    "../adapter_config.json", "/etc/passwd", "C:\\x\\adapter_model.safetensors", "a/../../adapter_config.json",
    "..\\..\\adapter_model.safetensors", "x" * 300, "é/adapter_config.json", "adapter_model.bin", "data.pkl"]),
    st.text(min_size=1, max_size=30))


@pytest.fixture(scope="module")
def adapter_files(vocab):
    with zipfile.ZipFile(io.BytesIO(make_adapter(vocab, 4, seed=9).zip_bytes)) as zf:
        return {n.split("/", 1)[1]: zf.read(n) for n in zf.namelist()}


@FUZZ
@given(names=st.lists(entry_names, min_size=1, max_size=6),
       contents=st.lists(st.sampled_from(["config", "weights", "bomb", "junk", "empty"]), min_size=6, max_size=6),
       symlink=st.booleans(), deflate=st.booleans())
def test_hostile_zips(world, attacker, adapter_files, names, contents, symlink, deflate):
    payloads = {"config": adapter_files["adapter_config.json"], "weights": adapter_files["adapter_model.safetensors"],
                "bomb": b"\0" * (8 << 20), "junk": b"PK\x03\x04junk", "empty": b""}
    data = zip_with([(n, payloads[c]) for n, c in zip(names, contents)], symlink, deflate)
    if len(data) > world.stack.settings.max_upload_bytes:
        data = data[: world.stack.settings.max_upload_bytes]  # a truncated zip is hostile too
    before = world.stack.store.list("acme")
    r = attacker.put("/v1/prefixes/zipped", files={"file": ("a.zip", data)})
    assert_sane(world, r)
    after = world.stack.store.list("acme")
    if r.status_code in (200, 201):  # a well-formed adapter among the noise: stored under its id only
        assert {p.prefix_id for p in after} - {p.prefix_id for p in before} <= {"zipped"}
        attacker.delete("/v1/prefixes/zipped")
    else:
        assert 400 <= r.status_code < 500 and after == before, (r.status_code, r.text[:300])


def test_zip_bomb_is_refused_without_inflating(world, attacker, adapter_files):
    # 2 GB of zeros claimed in a tiny file: refused from the declared size, or after reading
    # one byte past the limit when the size lies; never inflated.
    bomb = zip_with([("adapter_config.json", adapter_files["adapter_config.json"]),
                     ("adapter_model.safetensors", b"\0" * (64 << 20))])
    assert len(bomb) < world.stack.settings.max_upload_bytes
    r = attacker.put("/v1/prefixes/bomb", files={"file": ("a.zip", bomb)})
    assert r.status_code == 413 and "adapter_model.safetensors" in r.json()["error"]["message"], r.text
    assert world.stack.store.get_record("acme", "bomb") is None


@pytest.mark.parametrize("shape", [[2**20, 2**20, 1], [1, 2, 2, 2**31, 16], [2**39, 2**39], [64, 2, 8, 1 << 24, 128]])
def test_declared_shapes_of_many_gigabytes_are_refused_before_reading(world, attacker, shape):
    header = {"prefix_kv": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}}
    r = attacker.put("/v1/prefixes/huge", files={"file": ("p.safetensors", safetensors_blob(header, b"\0" * 4))})
    assert r.status_code in (400, 413), r.text
    assert_sane(world, r)


odd_ids = st.one_of(st.text(min_size=1, max_size=300), st.sampled_from([
    "x" * 128, "x" * 129, "x" * 5000, ".", "..", "...", "a.", ".a", "a..b", "a/b", "a%2Fb", "%2e%2e", "%2e%2e%2fx",
    "a\\b", "é", "ｍｉｎｅ", "mine\u200b", "user:", "user:..", "shared/x", "a b", "a%00b", "a;b", "a{b}", "🦊"]))


@FUZZ
@given(prefix_id=odd_ids)
def test_odd_prefix_ids(world, attacker, prefix_id, adapter_files):
    weights = adapter_files["adapter_model.safetensors"]
    before = {p.prefix_id for p in world.stack.store.list("acme")}
    # '/' and '%' go as they are (a slash, an encoded slash, encoded dots); the rest is
    # percent-encoded, lone surrogates too (invalid UTF-8 on the wire)
    path = "/v1/prefixes/" + quote(prefix_id, safe="/%:", errors="surrogatepass")
    r = attacker.put(path, files={"file": ("adapter_model.safetensors", weights)}, data={"num_virtual_tokens": "4"})
    assert_sane(world, r)
    after = {p.prefix_id for p in world.stack.store.list("acme")}
    if r.status_code in (200, 201):
        created = r.json()["id"]
        assert after - before <= {created} and attacker.get(f"/v1/prefixes/{created}").status_code == 200
        assert attacker.delete(f"/v1/prefixes/{created}").status_code == 204
    else:
        assert r.status_code in (400, 404, 405), (r.status_code, r.text[:300])
        assert after == before
    for method in ("GET", "DELETE"):
        assert_sane(world, attacker.request(method, path))
    assert_sane(world, post_raw(attacker, "/v1/generate", {"prefix_id": prefix_id, "prompt": "hi", "max_tokens": 2}))
    encoded = path.removeprefix("/v1/prefixes/")
    assert_sane(world, attacker.get("/v1/jobs/" + encoded))
    assert_sane(world, post_raw(attacker, f"/v1/users/{encoded}/personalize",
                                {"examples": [{"prompt": "a", "completion": "b"}], "steps": 1}))


def test_the_fuzzed_server_is_alive_idle_and_the_victim_untouched(world: World):
    stack = world.stack
    stack.wait_idle()
    s = stack.engine.stats()
    assert s.kv_blocks_free + s.kv_blocks_used_by_prefixes == s.kv_blocks_total
    assert httpx.get(f"{stack.url}/health").status_code == 200
    assert {r.prefix_id: r.version for r in stack.store.list(VICTIM)} == world.victim_prefixes
