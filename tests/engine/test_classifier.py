"""PrefixClassifier against real PEFT SEQ_CLS prefix models on a tiny random BERT: each
adapter alone, and all mixed in one batch (different prefix lengths, heads and input
lengths, one row with no prefix); and the clear errors of the SEQ_CLS reader."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from server.engine.classifier import ClassifierHead, ClassifyError, ClassifyInput, PrefixClassifier
from server.prefix import ModelKind, ModelMismatchError, PrefixError
from server.prefix.peft_format import (
    HEAD_BIAS,
    HEAD_WEIGHT,
    check_adapter_config,
    read_adapter,
    read_seq_cls_adapter,
)

NUM_VIRTUAL_TOKENS = (4, 7, 20)
LABELS = {0: "neg", 1: "neu", 2: "pos"}
TOL = 1e-4


def tiny_bert(seed: int = 0, hidden: int = 32) -> BertForSequenceClassification:
    """2 layers, hidden 32, 4 heads, vocab 100, 3 labels, float32."""
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=3,
                     id2label=dict(LABELS), label2id={v: k for k, v in LABELS.items()})
    return BertForSequenceClassification(cfg).eval()


def peft_seq_cls(base, num_virtual_tokens: int, seed: int):
    """A PEFT SEQ_CLS prefix model with a random prefix and its own random classifier head."""
    from peft import PrefixTuningConfig, get_peft_model

    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    with torch.no_grad():  # a head of its own, saved as modules_to_save
        model.classifier.weight.normal_(0, 0.5)
        model.classifier.bias.normal_(0, 0.5)
    peft_model = get_peft_model(model, PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=num_virtual_tokens))
    return peft_model.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The base model, the PrefixClassifier and three saved adapters, each loaded back both
    through PEFT (the reference) and through prefix-serve's reader."""
    from peft import PeftModel

    base = tiny_bert()
    clf = PrefixClassifier(copy.deepcopy(base))
    adapters = []
    for n, nvt in enumerate(NUM_VIRTUAL_TOKENS):
        folder = tmp_path_factory.mktemp(f"adapter{n}")
        peft_seq_cls(base, nvt, seed=10 + n).save_pretrained(folder)
        reference = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
        adapters.append((folder, reference, read_seq_cls_adapter(folder, clf.spec)))
    return base, clf, adapters


def _ids(seed: int, length: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 100, (length,), generator=g).tolist()


def _peft_logits(model, ids: list[int]) -> torch.Tensor:
    x = torch.tensor([ids])
    with torch.no_grad():
        return model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0]


def test_reader_finds_the_prefix_and_the_head(setup):
    _, clf, adapters = setup
    for (folder, reference, adapter), nvt in zip(adapters, NUM_VIRTUAL_TOKENS):
        assert adapter.kv.shape == (2, 2, 4, nvt, 8)
        assert adapter.head_weight.shape == (3, 32) and adapter.head_bias.shape == (3,)
        head = reference.base_model.classifier.modules_to_save["default"]
        assert torch.equal(adapter.head_weight, head.weight) and torch.equal(adapter.head_bias, head.bias)
        assert adapter.labels is None  # the adapter folder has no config.json
        assert torch.equal(read_adapter(folder, clf.spec), adapter.kv)  # the kv-only reader agrees


def test_peft_positions_start_after_the_prefix(setup):
    """What the classifier reproduces: PEFT's tokens sit at positions P + t (BERT's
    embeddings start after the cache), not 0 + t."""
    _, _, adapters = setup
    _, reference, adapter = adapters[1]
    ids = _ids(0, 9)
    seen = []
    embeddings = reference.base_model.bert.embeddings.position_embeddings
    hook = embeddings.register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    try:
        _peft_logits(reference, ids)
    finally:
        hook.remove()
    p = adapter.num_virtual_tokens
    assert seen[-1].flatten().tolist() == list(range(p, p + len(ids)))


@pytest.mark.parametrize("n", range(len(NUM_VIRTUAL_TOKENS)))
def test_each_adapter_alone_matches_peft(setup, n):
    _, clf, adapters = setup
    _, reference, adapter = adapters[n]
    for length in (1, 5, 12):
        ids = _ids(100 + length, length)
        [got] = clf.classify([ClassifyInput.of_adapter(ids, adapter)])
        want = _peft_logits(reference, ids)
        assert got.logits.dtype == torch.float32
        assert (got.logits - want).abs().max() < TOL, (n, length, got.logits, want)
        assert torch.allclose(got.probs, torch.softmax(want, -1), atol=TOL)
        assert got.labels == ("neg", "neu", "pos")  # the base model's id2label
    # the prefix matters: without it the logits differ
    [bare] = clf.classify([ClassifyInput(ids, None, ClassifierHead(adapter.head_weight, adapter.head_bias))])
    assert (bare.logits - want).abs().max() > 1e-3


def test_mixed_batch_matches_each_row_alone(setup):
    base, clf, adapters = setup
    by_row = [(0, 3), (1, 11), (2, 6), (None, 8), (1, 1), (0, 14), (2, 2)]  # (adapter, input length)
    batch, want = [], []
    for r, (a, length) in enumerate(by_row):
        ids = _ids(200 + r, length)
        if a is None:
            batch.append(ClassifyInput.of_adapter(ids, None))
            with torch.no_grad():
                want.append(base(torch.tensor([ids])).logits[0])
        else:
            batch.append(ClassifyInput.of_adapter(ids, adapters[a][2]))
            want.append(_peft_logits(adapters[a][1], ids))
    got = clf.classify(batch)
    assert len(got) == len(batch)
    for r, (g, w) in enumerate(zip(got, want)):
        assert (g.logits - w).abs().max() < TOL, (r, by_row[r], g.logits, w)
        assert abs(float(g.probs.sum()) - 1.0) < 1e-5
    # the same rows alone give the same logits as in the batch
    for r, row in enumerate(batch):
        [alone] = clf.classify([row])
        assert (alone.logits - got[r].logits).abs().max() < TOL


def test_eager_attention_gives_the_same_logits(setup):
    """The mask hides the padding with either attention kernel (sdpa is the default)."""
    base, clf, adapters = setup
    eager = copy.deepcopy(base)
    eager.set_attn_implementation("eager")
    eager_clf = PrefixClassifier(eager)
    batch = [ClassifyInput.of_adapter(_ids(400 + r, 2 + 3 * r), adapter) for r, (_, _, adapter) in enumerate(adapters)]
    batch.append(ClassifyInput(_ids(410, 4)))
    for g, e in zip(clf.classify(batch), eager_clf.classify(batch)):
        assert (g.logits - e.logits).abs().max() < TOL


def test_batch_token_limit(setup):
    base, _, adapters = setup
    small = PrefixClassifier(copy.deepcopy(base), max_batch_tokens=40)
    rows = [ClassifyInput.of_adapter(_ids(1, 3), adapters[2][2]), ClassifyInput(_ids(2, 5))]
    with pytest.raises(ClassifyError, match=r"pads to 2 rows \* \(prefix 20 \+ input 5\) = 50 tokens; the limit is 40"):
        small.classify(rows)
    assert len(small.classify(rows[1:])) == 1


def test_no_prefix_rows_only_is_the_base_model(setup):
    base, clf, _ = setup
    rows = [_ids(300, 5), _ids(301, 9)]
    got = clf.classify([ClassifyInput(ids) for ids in rows])
    for ids, g in zip(rows, got):
        with torch.no_grad():
            w = base(torch.tensor([ids])).logits[0]
        assert (g.logits - w).abs().max() < TOL
        assert g.label == LABELS[int(w.argmax())]


def test_labels_from_a_config_beside_the_adapter(setup, tmp_path):
    import shutil

    _, clf, adapters = setup
    folder = tmp_path / "a"
    shutil.copytree(adapters[0][0], folder)
    (folder / "config.json").write_text(json.dumps({"id2label": {"0": "bad", "1": "meh", "2": "good"}}))
    adapter = read_seq_cls_adapter(folder, clf.spec)
    assert adapter.labels == ("bad", "meh", "good")
    [got] = clf.classify([ClassifyInput.of_adapter(_ids(1, 4), adapter)])
    assert got.labels == ("bad", "meh", "good") and got.label in got.labels
    (folder / "config.json").write_text(json.dumps({"id2label": {"0": "a", "1": "b"}}))
    with pytest.raises(PrefixError, match="id2label names 2 labels; the classifier head has 3"):
        read_seq_cls_adapter(folder, clf.spec)


# ---- clear errors

def _copy_with_config(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


def test_wrong_task_type_is_refused_naming_both(setup, tmp_path):
    _, clf, adapters = setup
    folder = _copy_with_config(adapters[0][0], tmp_path / "a", task_type="CAUSAL_LM")
    with pytest.raises(PrefixError, match="task_type is 'CAUSAL_LM'; this seq_cls model needs 'SEQ_CLS'"):
        read_seq_cls_adapter(folder, clf.spec)


def test_seq_cls_adapter_refused_by_a_causal_lm():
    from dataclasses import replace

    from server.prefix import ModelSpec

    spec = ModelSpec(2, 4, 8, "f", 64)  # a causal LM's spec (the default kind)
    config = {"peft_type": "PREFIX_TUNING", "task_type": "SEQ_CLS", "num_virtual_tokens": 4}
    with pytest.raises(PrefixError, match="task_type is 'SEQ_CLS'; expected 'CAUSAL_LM' for this causal_lm model"):
        check_adapter_config(config, spec)
    check_adapter_config(config, spec, ModelKind.SEQ_CLS)  # the kind given overrides the spec's
    check_adapter_config(config, replace(spec, kind=ModelKind.SEQ_CLS))
    for task_type in (None, "CAUSAL_LM"):  # today's behaviour for causal LMs
        check_adapter_config({**config, "task_type": task_type}, spec)
    with pytest.raises(PrefixError, match="task_type is 'None'; this seq_cls model needs 'SEQ_CLS'"):
        check_adapter_config({**config, "task_type": None}, spec, ModelKind.SEQ_CLS)


def test_wrong_width_is_refused(setup, tmp_path):
    _, clf, adapters = setup
    folder = _copy_with_config(adapters[0][0], tmp_path / "a", token_dim=64)
    needs = r"token_dim is 64; this model needs num_kv_heads\(4\) \* head_dim\(8\) = 32"
    with pytest.raises(ModelMismatchError, match=needs):
        read_seq_cls_adapter(folder, clf.spec)
    # an adapter made for a wider BERT (hidden 64, 4 heads): its prefix rows are too wide
    from peft import PrefixTuningConfig, get_peft_model

    wide = get_peft_model(tiny_bert(hidden=64), PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(ModelMismatchError, match="token_dim is 64"):
        read_seq_cls_adapter(tmp_path / "wide", clf.spec)
    folder = _copy_with_config(tmp_path / "wide", tmp_path / "wide2", token_dim=None)
    with pytest.raises(ModelMismatchError, match=r"rows have 256 values; the model needs .* = 128"):
        read_seq_cls_adapter(folder, clf.spec)


def test_wrong_head_width_is_refused(setup, tmp_path):
    from safetensors.torch import load_file, save_file

    _, clf, adapters = setup
    folder = _copy_with_config(adapters[0][0], tmp_path / "a")
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors[HEAD_WEIGHT] = torch.zeros(3, 48)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    with pytest.raises(ModelMismatchError, match=r"classifier weight has shape \(3, 48\); .*hidden_size=32"):
        read_seq_cls_adapter(folder, clf.spec)
    tensors[HEAD_WEIGHT] = torch.zeros(3, 32)
    tensors[HEAD_BIAS] = torch.zeros(4)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    with pytest.raises(ModelMismatchError, match=r"bias has shape \(4,\); the weight has 3 labels"):
        read_seq_cls_adapter(folder, clf.spec)
    head = ClassifierHead(torch.zeros(3, 16), torch.zeros(3))
    with pytest.raises(ModelMismatchError, match=r"shape \(3, 16\)"):
        clf.classify([ClassifyInput([1, 2], None, head)])


def test_pickle_only_folder_is_refused(setup, tmp_path):
    _, clf, adapters = setup
    adapters[0][1].save_pretrained(tmp_path / "p", safe_serialization=False)
    assert (tmp_path / "p" / "adapter_model.bin").exists()
    assert not (tmp_path / "p" / "adapter_model.safetensors").exists()
    with pytest.raises(PrefixError, match="has no adapter_model.safetensors .*pickle and is refused"):
        read_seq_cls_adapter(tmp_path / "p", clf.spec)


def test_adapter_without_head_uses_the_base_head(setup, tmp_path):
    from safetensors.torch import load_file, save_file

    base, clf, adapters = setup
    folder = _copy_with_config(adapters[1][0], tmp_path / "a")
    tensors = load_file(folder / "adapter_model.safetensors")
    save_file({"prompt_embeddings": tensors["prompt_embeddings"]}, str(folder / "adapter_model.safetensors"))
    adapter = read_seq_cls_adapter(folder, clf.spec)
    assert adapter.head_weight is None
    ids = _ids(7, 6)
    [got] = clf.classify([ClassifyInput.of_adapter(ids, adapter)])
    [want] = clf.classify([ClassifyInput(ids, adapter.kv, clf.base_head)])
    assert torch.equal(got.logits, want.logits)
    save_file({"prompt_embeddings": tensors["prompt_embeddings"], HEAD_WEIGHT: tensors[HEAD_WEIGHT]},
              str(folder / "adapter_model.safetensors"))
    with pytest.raises(PrefixError, match=f"has '{HEAD_WEIGHT}' but not '{HEAD_BIAS}'"):
        read_seq_cls_adapter(folder, clf.spec)


@pytest.mark.parametrize("row, message", [
    (ClassifyInput([]), "row 0 has no input tokens"),
    (ClassifyInput([1, 100]), "row 0 has token id 100; the vocabulary has 100"),
    (ClassifyInput([1, 2], token_type_ids=[0]), "row 0 has 1 token type ids for 2 tokens"),
    (ClassifyInput(list(range(1, 61)), torch.zeros(2, 2, 4, 5, 8)),
     r"row 0 needs positions up to prefix 5 \+ input 60 = 65; the model has 64"),
], ids=["empty", "vocab", "token-types", "too-long"])
def test_bad_rows_are_refused(setup, row, message):
    _, clf, _ = setup
    with pytest.raises(ClassifyError, match=message):
        clf.classify([row])


def test_bad_prefix_is_refused(setup):
    _, clf, _ = setup
    with pytest.raises(PrefixError, match="row 1's prefix has 3 kv heads, model has 4"):
        clf.classify([ClassifyInput([1]), ClassifyInput([1], torch.zeros(2, 2, 3, 4, 8))])


def test_checked_prefix_objects_are_served_and_foreign_ones_refused(setup):
    from dataclasses import replace

    from server.prefix import Prefix

    _, clf, adapters = setup
    adapter = adapters[0][2]
    ids = _ids(5, 7)
    [as_prefix] = clf.classify([ClassifyInput(ids, Prefix.make(adapter.kv, clf.spec))])
    [as_tensor] = clf.classify([ClassifyInput(ids, adapter.kv)])
    assert torch.equal(as_prefix.logits, as_tensor.logits)
    foreign = Prefix.make(adapter.kv, replace(clf.spec, fingerprint="0123456789abcdef"))
    with pytest.raises(PrefixError, match="row 0's prefix was checked against another model"):
        clf.classify([ClassifyInput(ids, foreign)])
