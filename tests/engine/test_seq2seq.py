"""PrefixSeq2Seq against real PEFT SEQ_2_SEQ_LM prefix models on a tiny random BART and T5:
each adapter alone (teacher-forced logits and greedy tokens), all mixed in one batch
(different prefix lengths, one row with no prefix, different input lengths), the encoder
and the cross-attention projections run once per generate, and the clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

from server.engine.seq2seq import PrefixSeq2Seq, Seq2SeqError, Seq2SeqInput
from server.prefix import ModelKind, PrefixError
from server.prefix.peft_format import check_adapter_config, read_adapter

NUM_VIRTUAL_TOKENS = (3, 8)
VOCAB = 96
TOL = 1e-4
STEPS = 6


def tiny_bart(seed: int = 0, vocab: int = VOCAB) -> BartForConditionalGeneration:
    """3 encoder and 3 decoder layers (an odd L, so every prefix block is used), d_model 32,
    4 heads, vocab 96 (unless told), float32. No forced tokens, so generate is plain greedy."""
    torch.manual_seed(seed)
    cfg = BartConfig(vocab_size=vocab, d_model=32, encoder_layers=3, decoder_layers=3,
                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                     decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
                     pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                     forced_bos_token_id=None, forced_eos_token_id=None, init_std=0.08, tie_word_embeddings=False)
    return BartForConditionalGeneration(cfg).eval()


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    """4 layers each side (L even: PEFT's odd blocks are unused), d_model 32, 4 heads of 8,
    8 relative buckets up to distance 16 (so long prefix distances share buckets), float32."""
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=4, num_decoder_layers=4,
                   num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                   dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                   initializer_factor=1.5)
    return T5ForConditionalGeneration(cfg).eval()


def peft_seq2seq(base, num_virtual_tokens: int, seed: int):
    """A PEFT SEQ_2_SEQ_LM prefix model with a random (non-zero) prefix."""
    from peft import PrefixTuningConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(task_type="SEQ_2_SEQ_LM",
                                                                   num_virtual_tokens=num_virtual_tokens))
    torch.manual_seed(seed)
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.normal_(0, 1.0)
    return model.eval()


def _setup(base, tmp_path_factory, name):
    """The engine and two saved adapters, each loaded back through PEFT (the reference) and
    through prefix-serve's reader."""
    from peft import PeftModel

    engine = PrefixSeq2Seq(copy.deepcopy(base))
    adapters = []
    for n, nvt in enumerate(NUM_VIRTUAL_TOKENS):
        folder = tmp_path_factory.mktemp(f"{name}{n}")
        peft_seq2seq(base, nvt, seed=10 + n).save_pretrained(folder)
        reference = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
        adapters.append((folder, reference, read_adapter(folder, engine.spec)))
    return base, engine, adapters


@pytest.fixture(scope="module", params=["bart", "t5"])
def setup(request, tmp_path_factory):
    base = tiny_bart() if request.param == "bart" else tiny_t5()
    return _setup(base, tmp_path_factory, request.param)


def _ids(seed: int, length: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (length,), generator=g).tolist()  # no pad, bos or eos ids


def _reference_tokens(model, ids: list[int], n: int, eos: int) -> list[int]:
    """HF/PEFT greedy generate, without the decoder start token and the padding after eos."""
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, num_beams=1,
                             max_new_tokens=n)[0, 1:].tolist()
    return out[:out.index(eos) + 1] if eos in out else out


def _generate_logits(model, ids: list[int], n: int) -> torch.Tensor:
    """The per-step logits [steps, vocab] of HF/PEFT greedy generate (its incremental path)."""
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, num_beams=1,
                             max_new_tokens=n, output_logits=True, return_dict_in_generate=True)
    return torch.stack(out.logits)[:, 0]


def _reference_logits(model, ids: list[int], start: int, tokens: list[int]) -> torch.Tensor:
    """HF/PEFT forward logits [len(tokens), vocab] with the decoder teacher-forced on
    start + tokens[:-1]."""
    x = torch.tensor([ids])
    dec = torch.tensor([[start] + tokens[:-1]])
    with torch.no_grad():
        return model(input_ids=x, attention_mask=torch.ones_like(x), decoder_input_ids=dec).logits[0]


def _eos(engine) -> int:
    [eos] = engine.eos_token_ids
    return eos


def test_reader_reads_a_seq2seq_adapter(setup):
    _, engine, adapters = setup
    spec = engine.spec
    assert spec.kind is ModelKind.SEQ2SEQ_LM
    for (folder, reference, kv), nvt in zip(adapters, NUM_VIRTUAL_TOKENS):
        assert kv.shape == (spec.num_layers, 2, 4, nvt, 8)
        assert reference.peft_config["default"].num_transformer_submodules == 2
        weight = reference.prompt_encoder["default"].embedding.weight
        assert weight.shape == (nvt, spec.num_layers * 2 * 32)  # P rows, not 2P: one copy is saved
        assert weight.abs().min() > 0  # a prefix that can change the output


def test_peft_gives_decoder_layer_l_the_block_2l_mod_L(setup):
    """What the engine reproduces: PEFT's cache for a seq2seq model holds, as decoder layer
    l's self-attention prefix, block (2l) % L of the adapter, and an empty cross cache."""
    _, engine, adapters = setup
    _, reference, kv = adapters[1]
    cache = reference.get_prompt(batch_size=1)
    num_layers = engine.spec.num_layers
    assert len(cache.cross_attention_cache) == 0
    for layer in range(num_layers):
        keys = cache.self_attention_cache.layers[layer].keys[0]
        values = cache.self_attention_cache.layers[layer].values[0]
        block = (2 * layer) % num_layers
        assert engine.decoder_layer_block(layer) == block
        assert torch.equal(keys, kv[block, 0]) and torch.equal(values, kv[block, 1])


def test_peft_positions_with_a_prefix(setup):
    """BART: PEFT's decoder positions are P + d. T5: the first decoder block's relative bias
    has the query at P + d and the keys at 0 .. P + d."""
    base, _, adapters = setup
    _, reference, kv = adapters[1]
    p = kv.shape[3]
    ids, n = _ids(1, 7), 4
    seen = []
    if isinstance(base, BartForConditionalGeneration):
        module = reference.get_base_model().model.decoder.embed_positions
        hook = module.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs["position_ids"].clone()),
                                            with_kwargs=True)
    else:
        attn = reference.get_base_model().decoder.block[0].layer[0].SelfAttention
        original = attn.compute_bias

        def spy(query_length, key_length, device=None, past_seen_tokens=0):
            seen.append((query_length, key_length, int(past_seen_tokens)))
            return original(query_length, key_length, device, past_seen_tokens)
        attn.compute_bias = spy
    try:
        _reference_tokens(reference, ids, n, eos=-1)
    finally:
        if isinstance(base, BartForConditionalGeneration):
            hook.remove()
        else:
            del attn.compute_bias
    if isinstance(base, BartForConditionalGeneration):
        assert [s.flatten().tolist() for s in seen] == [[p + d] for d in range(n)]
    else:  # one query per step at P + d, keys 0 .. P + d
        assert seen == [(1, p + d + 1, p + d) for d in range(n)]


@pytest.mark.parametrize("n", range(len(NUM_VIRTUAL_TOKENS)))
def test_each_adapter_alone_matches_peft(setup, n):
    base, engine, adapters = setup
    _, reference, kv = adapters[n]
    eos = _eos(engine)
    for length in (1, 5, 12):
        ids = _ids(100 + length, length)
        [got] = engine.generate([Seq2SeqInput(ids, kv, max_new_tokens=STEPS)], return_logits=True)
        want_tokens = _reference_tokens(reference, ids, STEPS, eos)
        assert got.token_ids == want_tokens, (n, length)
        assert got.finish_reason == ("eos" if want_tokens[-1] == eos else "length")
        want = _reference_logits(reference, ids, engine.decoder_start_token_id, got.token_ids)
        assert got.logits.dtype == torch.float32 and got.logits.shape == want.shape
        assert (got.logits - want).abs().max() < TOL, (n, length, (got.logits - want).abs().max())
        # and the logits of PEFT's own generate, step by step
        assert (got.logits - _generate_logits(reference, ids, STEPS)).abs().max() < TOL
    # the prefix matters: without it the logits differ
    [bare] = engine.generate([Seq2SeqInput(ids, None, max_new_tokens=STEPS)], return_logits=True)
    assert (bare.logits[0] - got.logits[0]).abs().max() > 1e-2


def test_no_prefix_is_the_base_model(setup):
    base, engine, _ = setup
    eos = _eos(engine)
    for length in (2, 9):
        ids = _ids(300 + length, length)
        [got] = engine.generate([Seq2SeqInput(ids, max_new_tokens=STEPS)], return_logits=True)
        assert got.token_ids == _reference_tokens(base, ids, STEPS, eos)
        want = _reference_logits(base, ids, engine.decoder_start_token_id, got.token_ids)
        assert (got.logits - want).abs().max() < TOL


def test_unused_blocks_do_not_matter_and_used_ones_do(setup):
    """The layer mapping, seen from the outputs: changing a block no decoder layer reads
    changes nothing; changing one that is read changes the logits."""
    _, engine, adapters = setup
    kv = adapters[1][2]
    num_layers = engine.spec.num_layers
    used = {engine.decoder_layer_block(layer) for layer in range(num_layers)}
    ids = _ids(5, 6)
    [want] = engine.generate([Seq2SeqInput(ids, kv, max_new_tokens=3)], return_logits=True)
    for block in range(num_layers):
        changed = kv.clone()
        changed[block] += 1.0
        [got] = engine.generate([Seq2SeqInput(ids, changed, max_new_tokens=3)], return_logits=True)
        diff = float((got.logits[0] - want.logits[0]).abs().max())  # the first step: same inputs
        assert (diff > 1e-3) if block in used else (diff == 0.0), (block, diff)


def test_mixed_batch_matches_each_row_alone(setup):
    base, engine, adapters = setup
    eos = _eos(engine)
    # (adapter, input length, max_new_tokens): P = 3, 8 and none, lengths 1 .. 14
    by_row = [(0, 3, 5), (1, 11, 7), (None, 8, 6), (1, 1, 2), (0, 14, 7), (None, 2, 1), (1, 6, 4)]
    batch, solo = [], []
    for r, (a, length, n) in enumerate(by_row):
        ids = _ids(200 + r, length)
        kv = None if a is None else adapters[a][2]
        batch.append(Seq2SeqInput(ids, kv, max_new_tokens=n))
        reference = base if a is None else adapters[a][1]
        solo.append(_reference_tokens(reference, ids, n, eos))
    got = engine.generate(batch, return_logits=True)
    assert len(got) == len(batch)
    for r, (g, want_tokens) in enumerate(zip(got, solo)):
        assert g.token_ids == want_tokens, (r, by_row[r])
        [alone] = engine.generate([batch[r]], return_logits=True)
        assert alone.token_ids == g.token_ids
        assert (alone.logits - g.logits).abs().max() < TOL, (r, by_row[r])
    # the rows differ from each other, so a row reading another's prefix would show
    assert len({tuple(g.token_ids) for g in got if len(g.token_ids) >= 4}) > 1


def test_stops_at_eos(setup):
    """A model whose eos is a token greedy decoding reaches: generation stops there, as HF's does."""
    base, engine, adapters = setup
    _, reference, kv = adapters[0]
    ids = _ids(7, 5)
    [free] = engine.generate([Seq2SeqInput(ids, kv, max_new_tokens=8)])
    k = next(k for k in range(1, len(free.token_ids)) if free.token_ids[k] not in free.token_ids[:k])
    stop = free.token_ids[k]
    for m in (engine.model, reference):
        m.generation_config.eos_token_id = stop
    try:
        stopping = PrefixSeq2Seq(engine.model)
        rows = [Seq2SeqInput(ids, kv, max_new_tokens=8), Seq2SeqInput(_ids(8, 4), None, max_new_tokens=3)]
        got = stopping.generate(rows)
        assert got[0].token_ids == free.token_ids[:k + 1] and got[0].finish_reason == "eos"
        assert got[0].token_ids == _reference_tokens(reference, ids, 8, stop)
        assert len(got[1].token_ids) <= 3
    finally:
        for m in (engine.model, reference):
            m.generation_config.eos_token_id = _eos(engine)


def test_encoder_and_cross_attention_run_once_per_generate(setup):
    _, engine, adapters = setup
    calls = {"encoder": 0, "cross": 0, "decoder_layer0": 0}

    def count(name):
        def hook(module, args, output):
            calls[name] += 1
        return hook

    if engine.arch == "bart":
        cross_k = engine.decoder.layers[-1].encoder_attn.k_proj
        first_layer = engine.decoder.layers[0]
    else:
        cross_k = engine.decoder.block[-1].layer[1].EncDecAttention.k
        first_layer = engine.decoder.block[0]
    hooks = [engine.encoder.register_forward_hook(count("encoder")),
             cross_k.register_forward_hook(count("cross")),
             first_layer.register_forward_hook(count("decoder_layer0"))]
    try:
        rows = [Seq2SeqInput(_ids(1, 4), adapters[0][2], 5), Seq2SeqInput(_ids(2, 9), None, 5),
                Seq2SeqInput(_ids(3, 2), adapters[1][2], 5)]
        got = engine.generate(rows)
    finally:
        for h in hooks:
            h.remove()
    steps = max(len(g.token_ids) for g in got)
    assert steps > 1
    assert calls == {"encoder": 1, "cross": 1, "decoder_layer0": steps}


def test_eager_attention_gives_the_same_logits(setup):
    """The masks hide the padding with either attention kernel (sdpa is the default)."""
    base, engine, adapters = setup
    eager = copy.deepcopy(base)
    eager.set_attn_implementation("eager")
    rows = [Seq2SeqInput(_ids(400 + r, 2 + 3 * r), kv, 4) for r, (_, _, kv) in enumerate(adapters)]
    rows.append(Seq2SeqInput(_ids(410, 4), None, 4))
    for g, e in zip(engine.generate(rows, True), PrefixSeq2Seq(eager).generate(rows, True)):
        assert g.token_ids == e.token_ids
        assert (g.logits - e.logits).abs().max() < TOL


# ---- clear errors

def test_wrong_task_type_is_refused(setup, tmp_path):
    import json
    import shutil

    _, engine, adapters = setup
    folder = tmp_path / "a"
    shutil.copytree(adapters[0][0], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM" and config["num_transformer_submodules"] == 2
    check_adapter_config(config, engine.spec)
    (folder / "adapter_config.json").write_text(json.dumps({**config, "task_type": "CAUSAL_LM"}))
    with pytest.raises(PrefixError, match="task_type is 'CAUSAL_LM'; this seq2seq_lm model needs 'SEQ_2_SEQ_LM'"):
        read_adapter(folder, engine.spec)
    (folder / "adapter_config.json").write_text(json.dumps({**config, "num_transformer_submodules": 1}))
    with pytest.raises(PrefixError, match="num_transformer_submodules 1; seq2seq_lm models need 2"):
        read_adapter(folder, engine.spec)


def test_bad_rows_are_refused(setup):
    _, engine, _ = setup
    cases = [
        (Seq2SeqInput([]), "row 0 has no input tokens"),
        (Seq2SeqInput([3, VOCAB]), f"row 0 has token id {VOCAB}; the vocabulary has {VOCAB}"),
        (Seq2SeqInput([3, -1]), f"row 0 has token id -1; the vocabulary has {VOCAB}"),
        (Seq2SeqInput([3], max_new_tokens=0), "row 0 has max_new_tokens 0; expected a positive integer"),
        (Seq2SeqInput([3] * (engine.max_input_len + 1)),
         f"row 0 has {engine.max_input_len + 1} input tokens; the encoder takes at most {engine.max_input_len}"),
    ]
    for row, message in cases:
        with pytest.raises(Seq2SeqError, match=message):
            engine.generate([Seq2SeqInput([3, 4]), row][1:])


def test_too_many_decoder_positions_are_refused():
    engine = PrefixSeq2Seq(tiny_bart())  # 64 learned decoder positions
    kv = torch.zeros(engine.spec.kv_shape(8))
    with pytest.raises(Seq2SeqError, match=r"row 1 needs decoder positions up to prefix 8 \+ max_new_tokens 57 = 65; "
                                           "the model has 64"):
        engine.generate([Seq2SeqInput([3]), Seq2SeqInput([3], kv, max_new_tokens=57)])
    assert len(engine.generate([Seq2SeqInput([3], kv, max_new_tokens=56)])[0].token_ids) <= 56


def test_bad_prefix_is_refused(setup):
    _, engine, _ = setup
    spec = engine.spec
    wrong_heads = torch.zeros(spec.num_layers, 2, 3, 4, spec.head_dim)
    with pytest.raises(PrefixError, match="row 1's prefix has 3 kv heads, model has 4"):
        engine.generate([Seq2SeqInput([3]), Seq2SeqInput([3], wrong_heads)])
    wrong_layers = torch.zeros(spec.num_layers + 1, 2, 4, 4, spec.head_dim)
    with pytest.raises(PrefixError, match=f"row 0's prefix has {spec.num_layers + 1} layers, model has {spec.num_layers}"):
        engine.generate([Seq2SeqInput([3], wrong_layers)])
    nan = torch.full(spec.kv_shape(2), float("nan"))
    with pytest.raises(PrefixError, match="row 0's prefix has .* non-finite values"):
        engine.generate([Seq2SeqInput([3], nan)])


def test_checked_prefix_objects_are_served_and_foreign_ones_refused(setup):
    from dataclasses import replace

    from server.prefix import Prefix

    _, engine, adapters = setup
    kv = adapters[0][2]
    ids = _ids(5, 7)
    [as_prefix] = engine.generate([Seq2SeqInput(ids, Prefix.make(kv, engine.spec), 3)], True)
    [as_tensor] = engine.generate([Seq2SeqInput(ids, kv, 3)], True)
    assert torch.equal(as_prefix.logits, as_tensor.logits)
    foreign = Prefix.make(kv, replace(engine.spec, fingerprint="0123456789abcdef"))
    with pytest.raises(PrefixError, match="row 0's prefix was checked against another model"):
        engine.generate([Seq2SeqInput(ids, foreign)])


def test_other_models_are_refused():
    from transformers import BertConfig, BertModel

    with pytest.raises(Seq2SeqError, match="needs a BartForConditionalGeneration or a T5ForConditionalGeneration"):
        PrefixSeq2Seq(BertModel(BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=8)))
    torch.manual_seed(0)
    uneven = BartForConditionalGeneration(BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=3,
                                                     encoder_attention_heads=4, decoder_attention_heads=4,
                                                     encoder_ffn_dim=16, decoder_ffn_dim=16))
    with pytest.raises(Seq2SeqError, match=r"decoder layers = encoder layers \(3 vs 2\)"):
        PrefixSeq2Seq(uneven)
