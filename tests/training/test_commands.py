"""`prefix-serve train` and `prefix-serve eval` end to end on a tiny model folder."""

from __future__ import annotations

import json

import pytest
import torch

from server.cli import main
from server.prefix import ModelSpec
from server.prefix.peft_format import read_adapter, write_adapter
from tests.training.conftest import MEMORY_EXAMPLES


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, task_then_user):
    """The fixture's tiny Llama and byte tokenizer saved as a HF folder."""
    model, tok, *_ = task_then_user
    folder = tmp_path_factory.mktemp("model")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in MEMORY_EXAMPLES))
    return path


def test_train_writes_a_peft_adapter_and_the_losses(model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "adapter"
    rc = main(["train", "--data", str(data_file), "--out", str(out), "--model", str(model_dir), "--steps", "20",
               "--num-virtual-tokens", "4", "--lr", "2e-2", "--batch-size", "2", "--mid-dim", "32",
               "--init-text", "greet:", "--device", "cpu"])
    assert rc == 0
    summary = json.loads((out / "training.json").read_text())
    assert summary["steps_done"] == 20 and len(summary["losses"]) == 20
    assert summary["final_loss"] < 0.7 * summary["first_loss"]
    assert summary["config"]["init_text"] == "greet:"
    from transformers import AutoModelForCausalLM

    spec = ModelSpec.from_hf(AutoModelForCausalLM.from_pretrained(model_dir))
    assert read_adapter(out, spec).shape == spec.kv_shape(4)
    assert "20/20" in capsys.readouterr().err  # the progress bar ran to the end


def test_train_refuses_bad_settings_before_loading_anything(data_file, tmp_path, capsys):
    rc = main(["train", "--data", str(data_file), "--out", str(tmp_path / "x"), "--num-virtual-tokens", "0"])
    assert rc == 2
    assert "num_virtual_tokens must be an integer >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_eval_reports_bleu_of_composed_prefixes_served_by_the_engine(model_dir, data_file, task_then_user,
                                                                     tmp_path, capsys):
    model, _, _, task_kv, result = task_then_user
    spec = ModelSpec.from_hf(model)
    task_dir = write_adapter(task_kv, tmp_path / "task", spec)
    user_dir = write_adapter(result.kv, tmp_path / "user", spec)
    common = ["eval", "--data", str(data_file), "--model", str(model_dir), "--max-tokens", "20",
              "--kv-cache-mb", "4", "--device", "cpu", "--json"]
    outputs = tmp_path / "outputs.jsonl"
    assert main(common + ["--prefix", str(task_dir), "--prefix", str(user_dir), "--outputs", str(outputs)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bleu"] == pytest.approx(100.0) and report["inputs"] == 2
    rows = [json.loads(line) for line in outputs.read_text().splitlines()]
    assert [r["generation"] for r in rows] == [c.strip() for _, c in MEMORY_EXAMPLES]
    # The base model, or the user prefix without its task prefix, does not know the answers.
    assert main(common) == 0
    assert json.loads(capsys.readouterr().out)["bleu"] < 50
    assert main(common + ["--prefix", str(user_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["bleu"] < 100
    assert torch.equal(read_adapter(user_dir, spec), result.kv)
