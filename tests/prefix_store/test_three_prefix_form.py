"""The three-prefix form of a seq2seq prefix (decoder kv plus optional encoder and cross
parts, one file, one hash): codec round trips, refusals with the numbers, the store's put
and get, and Prefix.make / compose carrying the parts."""

from __future__ import annotations

import pytest
import torch

from prefix_store import codec
from server.prefix import ClassifierHead, ModelKind, ModelSpec, Prefix, PrefixError, compose
from tests.prefix_store.helpers import FINGERPRINT, make_kv

SEQ2SEQ = ModelSpec(num_layers=2, num_kv_heads=2, head_dim=8, fingerprint="s2s", max_model_len=64,
                    kind=ModelKind.SEQ2SEQ_LM)


def test_codec_round_trip_with_each_combination_of_parts():
    kv, enc, cross = make_kv(0, plen=3), make_kv(1, plen=5), make_kv(2, plen=2)
    versions = set()
    for encoder_kv, cross_kv in ((None, None), (enc, None), (None, cross), (enc, cross)):
        data, version = codec.encode(kv, encoder_kv=encoder_kv, cross_kv=cross_kv)
        versions.add(version)
        got = codec.decode_all(data, version)
        assert torch.equal(got.kv, kv) and got.head is None
        for want, have in ((encoder_kv, got.encoder_kv), (cross_kv, got.cross_kv)):
            assert (have is None) if want is None else torch.equal(have, want)
        assert torch.equal(codec.load(data), kv)  # decoder-only readers read the decoder part
    assert len(versions) == 4  # the parts are part of the version
    plain, _ = codec.encode(kv)
    assert codec.encode(kv, encoder_kv=None, cross_kv=None)[0] == plain  # a PEFT-form prefix: bytes unchanged


def test_codec_refuses_parts_that_do_not_match_the_kv():
    kv = make_kv(0, plen=3)
    wrong_heads = torch.zeros(2, 2, 3, 4, 8)
    with pytest.raises(PrefixError, match=r"encoder_kv has shape \(2, 2, 3, 4, 8\) float32; the prefix kv has "
                                          r"\(2, 2, 2, 3, 8\) float32"):
        codec.encode(kv, encoder_kv=wrong_heads)
    with pytest.raises(PrefixError, match=r"cross_kv has shape \(2, 2, 2, 4, 8\) bfloat16"):
        codec.encode(kv, cross_kv=make_kv(1, torch.bfloat16, plen=4))
    head = ClassifierHead(torch.zeros(3, 16), torch.zeros(3))
    with pytest.raises(PrefixError, match="a prefix with a classifier head cannot also have encoder_kv"):
        codec.encode(kv, head, encoder_kv=make_kv(1))
    with pytest.raises(PrefixError, match="expected"):
        codec.encode(kv, cross_kv=torch.zeros(2, 2, 8))


def test_codec_refuses_a_file_with_unknown_or_mismatched_tensors():
    from safetensors.torch import save as st_save

    kv = make_kv(0, plen=3)
    odd = st_save({"prefix_kv": kv, "encoder_kv": make_kv(1), "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="stored tensor file holds"):
        codec.load_all(odd)
    bad = st_save({"prefix_kv": kv, "cross_kv": torch.zeros(3, 2, 2, 1, 8)})
    with pytest.raises(ValueError, match=r"cross_kv has shape \(3, 2, 2, 1, 8\)"):
        codec.load_all(bad)


def test_store_put_and_get_keep_the_parts_under_one_version(store):
    kv, enc, cross = make_kv(0, plen=3), make_kv(1, plen=5), make_kv(2, plen=2)
    record, _ = store.put("acme", "summaries", kv, model_fingerprint=FINGERPRINT, encoder_kv=enc, cross_kv=cross,
                          serving_dtype=torch.bfloat16)
    assert (record.num_virtual_tokens, record.encoder_tokens, record.cross_tokens) == (3, 5, 2)
    assert record.bytes == (kv.numel() + enc.numel() + cross.numel()) * 4
    assert record.serving_copies == {}  # read as stored, like a prefix with a head
    assert record.version == codec.encode(kv, encoder_kv=enc, cross_kv=cross)[1]
    got = store.get_version("acme", "summaries", record.version, with_parts=True)
    assert torch.equal(got.kv, kv) and torch.equal(got.encoder_kv, enc) and torch.equal(got.cross_kv, cross)
    _, plain = store.get("acme", "summaries")
    assert torch.equal(plain, kv)
    # a decoder-only prefix: no parts, lengths 0
    record, _ = store.put("acme", "peft", kv, model_fingerprint=FINGERPRINT)
    assert (record.encoder_tokens, record.cross_tokens) == (0, 0)
    got = store.get_version("acme", "peft", record.version, with_parts=True)
    assert got.encoder_kv is None and got.cross_kv is None


def test_prefix_make_checks_and_carries_the_parts():
    kv, enc, cross = make_kv(0, plen=3), make_kv(1, plen=5), make_kv(2, plen=2)
    prefix = Prefix.make(kv, SEQ2SEQ, dtype=torch.bfloat16, encoder_kv=enc, cross_kv=cross)
    assert prefix.encoder_kv.dtype == torch.bfloat16 and torch.equal(prefix.cross_kv, cross.to(torch.bfloat16))
    assert (prefix.length, prefix.encoder_length, prefix.cross_length) == (3, 5, 2)
    assert prefix.nbytes == (kv.numel() + enc.numel() + cross.numel()) * 2
    with pytest.raises(PrefixError, match="prefix encoder_kv has 3 kv heads, model has 2"):
        Prefix.make(kv, SEQ2SEQ, encoder_kv=torch.zeros(2, 2, 3, 4, 8))
    with pytest.raises(PrefixError, match="prefix cross_kv has .* non-finite values"):
        Prefix.make(kv, SEQ2SEQ, cross_kv=torch.full((2, 2, 2, 1, 8), float("nan")))
    causal = ModelSpec(num_layers=2, num_kv_heads=2, head_dim=8, fingerprint="c", max_model_len=64)
    with pytest.raises(PrefixError, match="a prefix with cross_kv needs a seq2seq_lm model; this one is causal_lm"):
        Prefix.make(kv, causal, cross_kv=cross)


def test_compose_concatenates_each_part():
    a = Prefix.make(make_kv(0, plen=3), SEQ2SEQ, encoder_kv=make_kv(1, plen=2))
    b = Prefix.make(make_kv(2, plen=1), SEQ2SEQ, encoder_kv=make_kv(3, plen=4), cross_kv=make_kv(4, plen=2))
    both = compose([a, b])
    assert (both.length, both.encoder_length, both.cross_length) == (4, 6, 2)
    assert torch.equal(both.encoder_kv, torch.cat([a.encoder_kv, b.encoder_kv], dim=3))
    assert torch.equal(both.cross_kv, b.cross_kv)
    plain = compose([Prefix.make(make_kv(5), SEQ2SEQ), Prefix.make(make_kv(6), SEQ2SEQ)])
    assert plain.encoder_kv is None and plain.cross_kv is None
