"""POST /v1/classify end to end: a real `prefix-serve serve` on a tiny random BERT
(BertForSequenceClassification, float32), PEFT SEQ_CLS prefix adapters uploaded as the zip
of their folder (prefix, trained head and label names), and PEFT's own logits as the
reference: each adapter alone, and concurrent requests on different prefixes batched
together. Also the 400s of routes that do not fit the loaded kind, on both kinds of server,
and the refused upload of an adapter for another kind."""

from __future__ import annotations

import copy
import io
import json
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.api.harness import upload
from tests.engine.test_classifier import LABELS, peft_seq_cls, tiny_bert
from tests.observability.server_process import ServerProcess

TOL = 1e-4
WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "mat", "fast", "slow", "good", "bad", "very", "not"]
TEXTS = ["the cat sat on the mat", "a dog ran fast", "very very good", "not bad", "the slow cat",
         "a good dog sat on a mat not fast"]


def bert_tokenizer(folder: Path):
    """A WordPiece tokenizer of exactly 100 ids (tiny_bert's vocabulary), written offline."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    vocab += [f"w{i}" for i in range(100 - len(vocab))]
    path = folder / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab_file=str(path))


def zip_folder(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, f"adapter/{f.relative_to(folder)}")
    return buf.getvalue()


@pytest.fixture(scope="module")
def bert_server(tmp_path_factory, redis_server):
    from peft import PeftModel

    root = tmp_path_factory.mktemp("bert")
    model_dir = root / "tiny-bert"
    base = tiny_bert()
    base.save_pretrained(model_dir)
    tokenizer = bert_tokenizer(root)
    tokenizer.save_pretrained(model_dir)
    adapters = {}
    for name, nvt, seed, with_labels in (("sentiment", 4, 10, True), ("topic", 7, 11, False)):
        folder = root / name
        peft_seq_cls(base, nvt, seed).save_pretrained(folder)
        if with_labels:  # the base config beside the adapter names the labels
            (folder / "config.json").write_text(json.dumps({"id2label": {"0": "sad", "1": "meh", "2": "glad"}}))
        reference = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
        adapters[name] = (zip_folder(folder), reference)
    server = ServerProcess(model_dir, redis_server.url, root, "bert").start().wait_ready()
    try:
        yield server, base, tokenizer, adapters
    finally:
        server.stop()


def peft_logits(model, tokenizer, text: str) -> torch.Tensor:
    enc = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[0]


def test_uploaded_seq_cls_adapters_classify_as_peft(bert_server):
    server, _, tokenizer, adapters = bert_server
    with server.client() as c:
        for name, (data, _) in adapters.items():
            r = upload(c, name, data)
            assert r.status_code == 201, r.text
        for name, (_, reference) in adapters.items():
            r = c.post("/v1/classify", json={"prefix_id": name, "input": TEXTS})
            assert r.status_code == 200, r.text
            body = r.json()
            assert [d["index"] for d in body["data"]] == list(range(len(TEXTS)))
            assert body["prefix"][0]["id"] == name
            for text, row in zip(TEXTS, body["data"]):
                want = peft_logits(reference, tokenizer, text)
                assert torch.allclose(torch.tensor(row["logits"]), want, atol=TOL), (name, text)
                probs = torch.softmax(want, -1)
                names = ["sad", "meh", "glad"] if name == "sentiment" else list(LABELS.values())
                assert list(row["probs"]) == names  # the adapter's own names, else the base config's
                assert torch.allclose(torch.tensor(list(row["probs"].values())), probs, atol=TOL)
                assert row["label"] == names[int(want.argmax())]


def test_the_base_model_classifies_without_a_prefix(bert_server):
    server, base, tokenizer, _ = bert_server
    with server.client() as c:
        r = c.post("/v1/classify", json={"input": "the cat sat"})
    assert r.status_code == 200, r.text
    want = peft_logits(base, tokenizer, "the cat sat")
    assert torch.allclose(torch.tensor(r.json()["data"][0]["logits"]), want, atol=TOL)
    assert r.json()["prefix"] == []


def test_concurrent_requests_on_different_prefixes_each_get_their_own_logits(bert_server):
    server, base, tokenizer, adapters = bert_server
    with server.client() as c:
        for name, (data, _) in adapters.items():
            assert upload(c, name, data).status_code in (200, 201)
    jobs = [(name, TEXTS[i % len(TEXTS)]) for i in range(24) for name in (None, "sentiment", "topic")]

    def one(job):
        name, text = job
        with server.client() as c:
            r = c.post("/v1/classify", json={"prefix_id": name, "input": [text]})
        assert r.status_code == 200, r.text
        return torch.tensor(r.json()["data"][0]["logits"])

    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(one, jobs))
    for (name, text), logits in zip(jobs, got):
        model = base if name is None else adapters[name][1]
        assert torch.allclose(logits, peft_logits(model, tokenizer, text), atol=TOL), (name, text)


def test_generation_routes_on_a_classifier_say_which_kind_is_loaded(bert_server):
    server, *_ = bert_server
    with server.client() as c:
        for path, body in (("/v1/generate", {"prompt": "hi"}),
                           ("/v1/completions", {"model": "tiny-bert", "prompt": "hi"}),
                           ("/v1/chat/completions", {"model": "tiny-bert", "messages": [{"role": "user", "content": "hi"}]}),
                           ("/v1/users/u1/personalize", {"examples": [{"prompt": "a", "completion": "b"}]})):
            r = c.post(path, json=body)
            assert r.status_code == 400, (path, r.text)
            err = r.json()["error"]
            assert err["type"] == "wrong_model_kind", (path, err)
            assert "seq_cls" in err["message"] and "/v1/classify" in err["message"], err
        r = c.put("/v1/prefixes/pp", json={"text": "a system prompt"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "wrong_model_kind", r.text
        models = c.get("/v1/models").json()["data"]
        assert models[0]["id"] == "tiny-bert" and models[0]["kind"] == "seq_cls"


def test_a_causal_lm_adapter_is_refused_and_nothing_is_stored(bert_server, vocab):
    from tests.api.harness import make_adapter

    server, *_ = bert_server
    with server.client() as c:
        r = upload(c, "wrong-kind", make_adapter(vocab, 4, seed=1).zip_bytes)
        assert r.status_code in (400, 422), r.text
        assert "task_type" in r.json()["error"]["message"] and "SEQ_CLS" in r.json()["error"]["message"]
        assert c.get("/v1/prefixes/wrong-kind").status_code == 404


def test_bad_classify_requests_get_clear_errors(bert_server):
    server, *_ = bert_server
    with server.client() as c:
        r = c.post("/v1/classify", json={"input": []})
        assert r.status_code == 400 and "empty" in r.json()["error"]["message"]
        r = c.post("/v1/classify", json={"input": " ".join(["cat"] * 80)})
        assert r.status_code == 400 and "64" in r.json()["error"]["message"], r.text
        r = c.post("/v1/classify", json={"prefix_id": "nope", "input": "a"})
        assert r.status_code == 404, r.text


def test_classify_on_a_causal_lm_server_says_which_kind_is_loaded(stack):
    with stack.client() as c:
        r = c.post("/v1/classify", json={"input": "hello"})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["type"] == "wrong_model_kind" and "causal_lm" in err["message"] and "/v1/generate" in err["message"]
        assert c.get("/v1/models").json()["data"][0]["kind"] == "causal_lm"
