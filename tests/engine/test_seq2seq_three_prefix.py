"""PrefixSeq2Seq with the three-prefix form (decoder part + encoder and cross-attention parts)
on a tiny random BART and T5.

PEFT cannot represent the encoder and cross parts, so the reference is real PEFT for the
decoder part (a SEQ_2_SEQ_LM adapter) with the encoder self-attention and the decoder
cross-attention modules of its base model replaced, for one row at a time, by a plain
attention written out here that prepends the extra keys and values explicitly (T5: the
encoder bias with prefix slot s at s and token i at P_enc + i). Logits within 1e-4 and
greedy tokens equal, alone and in mixed batches; dropping a part changes the output."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import BartForConditionalGeneration

from server.engine.seq2seq import PrefixSeq2Seq, Seq2SeqInput
from server.prefix import Prefix
from tests.engine.test_seq2seq import (TOL, _eos, _ids, _reference_logits, _reference_tokens, _setup, tiny_bart,
                                       tiny_t5)

STEPS = 6


@pytest.fixture(scope="module", params=["bart", "t5"])
def setup(request, tmp_path_factory):
    base = tiny_bart() if request.param == "bart" else tiny_t5()
    return _setup(base, tmp_path_factory, f"three-{request.param}")


def _part(engine: PrefixSeq2Seq, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(engine.spec.kv_shape(length), generator=g)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    b, t, _ = x.shape
    return x.view(b, t, -1, head_dim).transpose(1, 2)  # [B, H, T, hd]


def _explicit_attention(q, k, v, prefix_k, prefix_v, scale, bias=None):
    """softmax(q [k_prefix; k]^T * scale + bias) [v_prefix; v], one row (no padding)."""
    k = torch.cat([prefix_k[None].to(k.dtype), k], dim=2)
    v = torch.cat([prefix_v[None].to(v.dtype), v], dim=2)
    scores = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias
    out = torch.softmax(scores, dim=-1) @ v  # [1, H, T, hd]
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def _bart_forward(attn, prefix, cross: bool):
    def forward(hidden_states, key_value_states=None, past_key_values=None, attention_mask=None, **kwargs):
        assert hidden_states.shape[0] == 1
        source = key_value_states if cross else hidden_states
        hd = attn.head_dim
        out = _explicit_attention(_heads(attn.q_proj(hidden_states), hd), _heads(attn.k_proj(source), hd),
                                  _heads(attn.v_proj(source), hd), prefix[0], prefix[1], attn.scaling)
        return attn.out_proj(out), None
    return forward


def _t5_forward(attn, prefix, cross: bool, bias_attn):
    def forward(hidden_states, mask=None, key_value_states=None, position_bias=None, past_key_values=None, **kwargs):
        assert hidden_states.shape[0] == 1
        source = key_value_states if cross else hidden_states
        hd = attn.key_value_proj_dim
        bias = None
        if not cross:  # query i at P + i; keys: slot s at s, token j at P + j
            p, t = prefix.shape[2], hidden_states.shape[1]
            queries = p + torch.arange(t)
            keys = torch.cat([torch.arange(p), p + torch.arange(t)])
            buckets = bias_attn._relative_position_bucket(keys[None, :] - queries[:, None], bidirectional=True,
                                                          num_buckets=bias_attn.relative_attention_num_buckets,
                                                          max_distance=bias_attn.relative_attention_max_distance)
            bias = bias_attn.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # [1, H, T, P + T]
        out = _explicit_attention(_heads(attn.q(hidden_states), hd), _heads(attn.k(source), hd),
                                  _heads(attn.v(source), hd), prefix[0], prefix[1], 1.0, bias)
        return attn.o(out), None, None
    return forward


@contextlib.contextmanager
def three_prefix_reference(peft_model, encoder_kv: torch.Tensor | None, cross_kv: torch.Tensor | None):
    """The PEFT model (its decoder part) with encoder layer l's self-attention seeing
    encoder_kv[l] and decoder layer l's cross-attention seeing cross_kv[l] first."""
    base = peft_model.get_base_model()
    patched = []
    if isinstance(base, BartForConditionalGeneration):
        encoder = [layer.self_attn for layer in base.model.encoder.layers]
        cross = [layer.encoder_attn for layer in base.model.decoder.layers]
        make = lambda attn, prefix, is_cross: _bart_forward(attn, prefix, is_cross)  # noqa: E731
    else:
        encoder = [block.layer[0].SelfAttention for block in base.encoder.block]
        cross = [block.layer[1].EncDecAttention for block in base.decoder.block]
        bias_attn = encoder[0]
        make = lambda attn, prefix, is_cross: _t5_forward(attn, prefix, is_cross, bias_attn)  # noqa: E731
    for modules, kv, is_cross in ((encoder, encoder_kv, False), (cross, cross_kv, True)):
        if kv is not None:
            for layer, attn in enumerate(modules):
                attn.forward = make(attn, kv[layer], is_cross)
                patched.append(attn)
    try:
        yield peft_model
    finally:
        for attn in patched:
            del attn.forward


def _check_against_reference(engine, reference, ids, prefix: Prefix, got, steps=STEPS):
    with three_prefix_reference(reference, prefix.encoder_kv, prefix.cross_kv) as model:
        want_tokens = _reference_tokens(model, ids, steps, _eos(engine))
        want = _reference_logits(model, ids, engine.decoder_start_token_id, got.token_ids)
    assert got.token_ids == want_tokens
    assert got.logits.shape == want.shape
    diff = float((got.logits - want).abs().max())
    assert diff < TOL, diff


PARTS = [(5, None), (None, 4), (5, 4), (2, 7)]  # (P_enc, P_cross)


@pytest.mark.parametrize("parts", PARTS)
def test_each_three_prefix_row_alone_matches_the_explicit_reference(setup, parts):
    _, engine, adapters = setup
    p_enc, p_cross = parts
    for n, (_, reference, kv) in enumerate(adapters):
        prefix = Prefix.make(kv, engine.spec, encoder_kv=None if p_enc is None else _part(engine, p_enc, 20 + n),
                             cross_kv=None if p_cross is None else _part(engine, p_cross, 30 + n))
        for length in (1, 6, 11):
            ids = _ids(500 + length, length)
            [got] = engine.generate([Seq2SeqInput(ids, prefix, STEPS)], return_logits=True)
            _check_against_reference(engine, reference, ids, prefix, got)


def test_the_reference_is_peft_when_there_are_no_parts(setup):
    """The patches only add: without parts the reference is PEFT itself, which the engine matches."""
    _, engine, adapters = setup
    _, reference, kv = adapters[1]
    ids = _ids(9, 7)
    [got] = engine.generate([Seq2SeqInput(ids, Prefix.make(kv, engine.spec), STEPS)], return_logits=True)
    _check_against_reference(engine, reference, ids, Prefix.make(kv, engine.spec), got)


def test_mixed_batch_matches_each_row_alone_and_the_reference(setup):
    base, engine, adapters = setup
    # (adapter or None, P_enc, P_cross, input length, max_new_tokens)
    by_row = [(0, 5, None, 3, 5), (1, None, 4, 11, 7), (None, None, None, 8, 6), (1, 5, 4, 1, 3),
              (0, 2, 7, 14, 7), (1, None, None, 6, 4), (0, None, 2, 2, 6)]
    batch, refs = [], []
    for r, (a, p_enc, p_cross, length, n) in enumerate(by_row):
        ids = _ids(600 + r, length)
        if a is None:
            batch.append(Seq2SeqInput(ids, None, n))
            refs.append(None)
            continue
        prefix = Prefix.make(adapters[a][2], engine.spec,
                             encoder_kv=None if p_enc is None else _part(engine, p_enc, 40 + r),
                             cross_kv=None if p_cross is None else _part(engine, p_cross, 50 + r))
        batch.append(Seq2SeqInput(ids, prefix, n))
        refs.append(adapters[a][1])
    got = engine.generate(batch, return_logits=True)
    for r, (g, row, reference) in enumerate(zip(got, batch, refs)):
        [alone] = engine.generate([row], return_logits=True)
        assert alone.token_ids == g.token_ids, (r, by_row[r])
        assert (alone.logits - g.logits).abs().max() < TOL, (r, by_row[r])
        if reference is None:
            assert g.token_ids == _reference_tokens(base, list(row.input_ids), row.max_new_tokens, _eos(engine))
        else:
            _check_against_reference(engine, reference, list(row.input_ids), row.prefix, g, row.max_new_tokens)
    assert len({tuple(g.token_ids) for g in got if len(g.token_ids) >= 4}) > 1


def test_dropping_a_part_changes_the_output(setup):
    """Mutation check: the engine reads both parts (and so would a server that lost one)."""
    _, engine, adapters = setup
    kv = adapters[0][2]
    ids = _ids(77, 6)
    enc, cross = _part(engine, 5, 1), _part(engine, 4, 2)
    variants = {"all": Prefix.make(kv, engine.spec, encoder_kv=enc, cross_kv=cross),
                "no cross": Prefix.make(kv, engine.spec, encoder_kv=enc),
                "no encoder": Prefix.make(kv, engine.spec, cross_kv=cross)}
    logits = {name: engine.generate([Seq2SeqInput(ids, p, 3)], return_logits=True)[0].logits[0]
              for name, p in variants.items()}
    for name in ("no cross", "no encoder"):
        assert (logits[name] - logits["all"]).abs().max() > 1e-2, name


def test_padding_slots_of_a_part_are_masked(setup):
    """A row's part padded up to another row's longer one: its logits are those it gets alone,
    even when the padding slots hold large values (padded_prefix_kv writes zeros; here a
    longer part with its tail cut off must equal the short one)."""
    _, engine, adapters = setup
    kv = adapters[1][2]
    short = Prefix.make(kv, engine.spec, encoder_kv=_part(engine, 2, 3), cross_kv=_part(engine, 1, 4))
    long = Prefix.make(kv, engine.spec, encoder_kv=_part(engine, 9, 5), cross_kv=_part(engine, 8, 6))
    rows = [Seq2SeqInput(_ids(1, 5), short, 4), Seq2SeqInput(_ids(2, 9), long, 4)]
    mixed = engine.generate(rows, return_logits=True)
    for row, g in zip(rows, mixed):
        [alone] = engine.generate([row], return_logits=True)
        assert alone.token_ids == g.token_ids and (alone.logits - g.logits).abs().max() < TOL


def test_encoder_layers_and_cross_projections_run_once_per_generate(setup):
    _, engine, adapters = setup
    calls = {"encoder_layer0": 0, "cross": 0}

    def count(name):
        def hook(module, args, output):
            calls[name] += 1
        return hook

    if engine.arch == "bart":
        layer0, cross_k = engine.encoder.layers[0], engine.decoder.layers[-1].encoder_attn.k_proj
    else:
        layer0, cross_k = engine.encoder.block[0], engine.decoder.block[-1].layer[1].EncDecAttention.k
    hooks = [layer0.register_forward_hook(count("encoder_layer0")), cross_k.register_forward_hook(count("cross"))]
    try:
        prefix = Prefix.make(adapters[0][2], engine.spec, encoder_kv=_part(engine, 3, 7), cross_kv=_part(engine, 2, 8))
        got = engine.generate([Seq2SeqInput(_ids(1, 4), prefix, 5), Seq2SeqInput(_ids(2, 7), None, 5)])
    finally:
        for h in hooks:
            h.remove()
    assert max(len(g.token_ids) for g in got) > 1
    assert calls == {"encoder_layer0": 1, "cross": 1}


def test_eager_attention_gives_the_same_logits(setup):
    import copy

    base, engine, adapters = setup
    eager = copy.deepcopy(base)
    eager.set_attn_implementation("eager")
    rows = [Seq2SeqInput(_ids(700 + r, 3 + 4 * r),
                         Prefix.make(kv, engine.spec, encoder_kv=_part(engine, 3 + r, r), cross_kv=_part(engine, 2, 9)), 4)
            for r, (_, _, kv) in enumerate(adapters)]
    rows.append(Seq2SeqInput(_ids(710, 4), None, 4))
    for g, e in zip(engine.generate(rows, True), PrefixSeq2Seq(eager).generate(rows, True)):
        assert g.token_ids == e.token_ids
        assert (g.logits - e.logits).abs().max() < TOL
