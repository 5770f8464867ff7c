"""Training the three-prefix form on a tiny BART (and the forward on a tiny T5): the training
forward is the serving forward, real-word init, a toy copy task's loss goes down, the
folded prefix round-trips through the codec, and `prefix-serve train --export-peft` writes
the decoder part as a PEFT SEQ_2_SEQ_LM adapter that PEFT loads and serves as we do."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration

from prefix_store import codec
from server.engine.seq2seq import PrefixSeq2Seq, Seq2SeqInput
from server.prefix import Prefix
from server.training.seq2seq_forward import teacher_forced_logits
from server.training.seq2seq_trainer import (Seq2SeqExample, Seq2SeqTrainConfig, real_word_init,
                                             train_three_prefix)
from tests.engine.test_seq2seq import tiny_bart, tiny_t5

TOL = 1e-4
CONFIG = Seq2SeqTrainConfig(num_virtual_tokens=4, encoder_tokens=3, cross_tokens=2, steps=20, learning_rate=3e-2,
                            batch_size=8, mid_dim=32, seed=0)  # every example each step: a steady loss


def copy_examples(engine: PrefixSeq2Seq, n: int = 8, length: int = 4) -> list[Seq2SeqExample]:
    """The toy copy task: the target is the source, then eos."""
    [eos] = engine.eos_token_ids
    g = torch.Generator().manual_seed(0)
    sources = [torch.randint(3, engine.vocab_size, (length,), generator=g).tolist() for _ in range(n)]
    return [Seq2SeqExample(tuple(s), tuple(s) + (eos,)) for s in sources]


@pytest.fixture(scope="module")
def trained():
    engine = PrefixSeq2Seq(tiny_bart())
    examples = copy_examples(engine)
    return engine, examples, train_three_prefix(engine, examples, CONFIG)


@pytest.mark.parametrize("make", [tiny_bart, tiny_t5])
def test_the_training_forward_gives_the_served_logits(make):
    engine = PrefixSeq2Seq(make())
    g = torch.Generator().manual_seed(3)
    kv, enc, cross = (torch.randn(engine.spec.kv_shape(p), generator=g) for p in (4, 3, 5))
    ids = torch.randint(3, engine.vocab_size, (7,), generator=g).tolist()
    for parts in ((enc, cross), (None, cross), (enc, None), (None, None)):
        prefix = Prefix.make(kv, engine.spec, encoder_kv=parts[0], cross_kv=parts[1])
        [served] = engine.generate([Seq2SeqInput(ids, prefix, 6)], return_logits=True)
        decoder_ids = torch.tensor([[engine.decoder_start_token_id] + served.token_ids[:-1]])
        with torch.no_grad():
            logits = teacher_forced_logits(engine, [ids], decoder_ids, kv, *parts)[0]
        assert (logits - served.logits).abs().max() < TOL, [part is not None for part in parts]


def test_real_word_init_is_the_models_own_keys_and_values():
    engine = PrefixSeq2Seq(tiny_bart())
    words = [5, 9, 11]
    init = real_word_init(engine, words, {"decoder": 4, "encoder": 3, "cross": 2})
    assert init["decoder"].shape == engine.spec.kv_shape(4) and init["encoder"].shape == engine.spec.kv_shape(3)
    enc, dec = engine.encoder, engine.decoder
    x = torch.tensor([words + words[:1]])  # repeated to the longest part, 4
    with torch.no_grad():
        # encoder layer 0's keys of the words: k_proj of the embedded words
        h = enc.layernorm_embedding(enc.embed_tokens(x) + enc.embed_positions(x))
        keys = enc.layers[0].self_attn.k_proj(h)[0].view(4, 4, 8).transpose(0, 1)  # [H, n, hd]
        # decoder layer 2's cross-attention values of the encoded words
        encoded = enc(input_ids=x).last_hidden_state
        values = dec.layers[2].encoder_attn.v_proj(encoded)[0].view(4, 4, 8).transpose(0, 1)
    assert torch.allclose(init["encoder"][0, 0], keys[:, :3], atol=1e-6)
    assert torch.allclose(init["cross"][2, 1], values[:, :2], atol=1e-6)
    # the decoder part in PEFT's layout: decoder layer l's words at block (2l) % L, L = 3
    layers = real_word_init(engine, words, {"decoder": 4})["decoder"]
    assert torch.equal(layers, init["decoder"])
    for layer, block in ((0, 0), (1, 2), (2, 1)):
        assert engine.decoder_layer_block(layer) == block
    with torch.no_grad():
        d = dec.layernorm_embedding(dec.embed_tokens(x) + dec.embed_positions(x))
        dec_keys = dec.layers[0].self_attn.k_proj(d)[0].view(4, 4, 8).transpose(0, 1)
    assert torch.allclose(init["decoder"][0, 0], dec_keys, atol=1e-6)


def test_a_few_steps_on_a_copy_task_reduce_the_loss(trained):
    _, _, result = trained
    assert len(result.losses) == CONFIG.steps
    assert result.losses[-1] < 0.8 * result.losses[0], (result.losses[0], result.losses[-1])
    for part, tensor in (("decoder", result.kv), ("encoder", result.encoder_kv), ("cross", result.cross_kv)):
        assert not torch.equal(tensor, result.init[part]), part  # every part was trained


def test_the_same_seed_gives_the_same_prefix(trained):
    engine, examples, result = trained
    again = train_three_prefix(engine, examples, Seq2SeqTrainConfig(**{**CONFIG.__dict__, "steps": 3}))
    once_more = train_three_prefix(engine, examples, Seq2SeqTrainConfig(**{**CONFIG.__dict__, "steps": 3}))
    assert again.losses == once_more.losses and torch.equal(again.cross_kv, once_more.cross_kv)
    assert again.losses[0] == result.losses[0]


def test_the_trained_prefix_round_trips_through_the_codec_and_serves(trained):
    engine, examples, result = trained
    data, version = codec.encode(result.kv, encoder_kv=result.encoder_kv, cross_kv=result.cross_kv)
    stored = codec.decode_all(data, version)
    assert torch.equal(stored.kv, result.kv) and torch.equal(stored.encoder_kv, result.encoder_kv)
    assert torch.equal(stored.cross_kv, result.cross_kv)
    prefix = Prefix.make(stored.kv, engine.spec, encoder_kv=stored.encoder_kv, cross_kv=stored.cross_kv)
    source = list(examples[0].source_ids)
    [got] = engine.generate([Seq2SeqInput(source, prefix, 5)], return_logits=True)
    decoder_ids = torch.tensor([[engine.decoder_start_token_id] + got.token_ids[:-1]])
    with torch.no_grad():  # the folded prefix serves what the MLP trained
        logits = teacher_forced_logits(engine, [source], decoder_ids, result.kv, result.encoder_kv, result.cross_kv)
    assert (logits[0] - got.logits).abs().max() < TOL


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="encoder_tokens must be an integer >= 0, got -1"):
        Seq2SeqTrainConfig(encoder_tokens=-1)
    with pytest.raises(ValueError, match="a part of 40 virtual tokens cannot start from real words through mid_dim 32"):
        Seq2SeqTrainConfig(cross_tokens=40, mid_dim=32)
    engine = PrefixSeq2Seq(tiny_bart())
    with pytest.raises(ValueError, match="example 1 has 0 source and 2 target tokens"):
        train_three_prefix(engine, [Seq2SeqExample((4,), (4, 2)), Seq2SeqExample((), (4, 2))], CONFIG)


# ---- the command, on a BART folder with a byte tokenizer

@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory):
    from tests.training.conftest import make_byte_tokenizer

    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=260, d_model=32, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                     dropout=0.0, attention_dropout=0.0, pad_token_id=256, bos_token_id=256, eos_token_id=256,
                     decoder_start_token_id=256, forced_bos_token_id=None, forced_eos_token_id=None, init_std=0.08,
                     tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("bart")
    BartForConditionalGeneration(cfg).save_pretrained(folder)
    make_byte_tokenizer().save_pretrained(folder)
    return folder


def test_train_command_writes_the_three_prefix_and_a_peft_export(bart_dir, tmp_path, capsys):
    from peft import PeftModel

    from server.cli import main
    from server.prefix.peft_format import read_adapter

    data = tmp_path / "copy.jsonl"
    data.write_text("".join(json.dumps({"prompt": w, "completion": w}) + "\n" for w in ("abc", "hello", "xyz", "prefix")))
    out, peft_dir = tmp_path / "out", tmp_path / "peft"
    rc = main(["train", "--model", str(bart_dir), "--data", str(data), "--out", str(out), "--steps", "12",
               "--num-virtual-tokens", "3", "--encoder-tokens", "2", "--cross-tokens", "4", "--lr", "1e-2",
               "--batch-size", "4", "--mid-dim", "16", "--init-text", "copy:", "--device", "cpu",
               "--export-peft", str(peft_dir)])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "training.json").read_text())
    assert summary["steps_done"] == 12 and summary["final_loss"] < summary["first_loss"]
    stored = codec.decode_all((out / "prefix.safetensors").read_bytes(), summary["version"])
    assert [t.shape[3] for t in (stored.kv, stored.encoder_kv, stored.cross_kv)] == [3, 2, 4]

    # PEFT loads the export, and its decoder-only outputs are ours with only the decoder part
    base = BartForConditionalGeneration.from_pretrained(bart_dir).eval()
    engine = PrefixSeq2Seq(BartForConditionalGeneration.from_pretrained(bart_dir))
    assert torch.equal(read_adapter(peft_dir, engine.spec), stored.kv)
    reference = PeftModel.from_pretrained(base, peft_dir).eval()
    assert reference.peft_config["default"].task_type == "SEQ_2_SEQ_LM"
    ids = [ord(c) for c in "hello"]
    [ours] = engine.generate([Seq2SeqInput(ids, Prefix.make(stored.kv, engine.spec), 6)], return_logits=True)
    x = torch.tensor([ids])
    with torch.no_grad():
        want = reference.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, num_beams=1,
                                  max_new_tokens=6)[0, 1:].tolist()
        logits = reference(input_ids=x, attention_mask=torch.ones_like(x),
                           decoder_input_ids=torch.tensor([[256] + ours.token_ids[:-1]])).logits[0]
    assert ours.token_ids == (want[:want.index(256) + 1] if 256 in want else want)
    assert (ours.logits - logits).abs().max() < TOL
    # and the full three-prefix serves something else than the decoder part alone
    full = Prefix.make(stored.kv, engine.spec, encoder_kv=stored.encoder_kv, cross_kv=stored.cross_kv)
    [three] = engine.generate([Seq2SeqInput(ids, full, 6)], return_logits=True)
    assert (three.logits[0] - ours.logits[0]).abs().max() > 1e-3


def test_seq2seq_flags_are_refused_for_a_causal_model(tmp_path, capsys):
    from server.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "o"), "--export-peft", str(tmp_path / "p")]) == 2
    assert "are for seq2seq models" in capsys.readouterr().err
