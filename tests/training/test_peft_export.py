"""The exported adapter folder is what PEFT writes, and real PEFT serves it as we do."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from server.training.data import Example, tokenize
from server.prefix import ModelSpec
from server.prefix.peft_format import read_adapter, write_adapter
from server.training.prefix_forward import forward_with_prefix
from tests.factories import greedy_generate
from server.training.trainer import TrainConfig, train_prefix
from tests.training.conftest import MEMORY_EXAMPLES, make_byte_tokenizer, make_tiny_gpt2, make_tiny_llama

MODELS = {"llama-gqa": make_tiny_llama, "gpt2": make_tiny_gpt2}
EXAMPLES = [Example(p, c) for p, c in MEMORY_EXAMPLES]
CONFIG = TrainConfig(num_virtual_tokens=6, steps=40, learning_rate=2e-2, batch_size=2, mid_dim=48)


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(request, tmp_path_factory):
    """A prefix trained for a while (so it is not its init), exported to a folder."""
    make = MODELS[request.param]
    tok = make_byte_tokenizer()
    model = make()
    result = train_prefix(model, tokenize(tok, EXAMPLES, 64), CONFIG, tokenizer=tok)
    folder = write_adapter(result.kv, tmp_path_factory.mktemp(request.param) / "adapter",
                                 ModelSpec.from_hf(model), mid_dim=CONFIG.mid_dim)
    return make, model, result.kv, folder


def peft_reference_folder(make, tmp_path) -> str:
    """What PEFT itself saves for the same model and settings."""
    from peft import PrefixTuningConfig, get_peft_model

    peft_model = get_peft_model(make(), PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=CONFIG.num_virtual_tokens, prefix_projection=True,
        encoder_hidden_size=CONFIG.mid_dim))
    peft_model.save_pretrained(tmp_path)
    return tmp_path


def test_folder_matches_what_peft_writes(exported, tmp_path):
    make, model, kv, folder = exported
    reference = peft_reference_folder(make, tmp_path)
    ours_config = json.loads((folder / "adapter_config.json").read_text())
    peft_config = json.loads((reference / "adapter_config.json").read_text())
    assert ours_config == peft_config
    spec = ModelSpec.from_hf(model)
    assert ours_config["token_dim"] == spec.num_kv_heads * spec.head_dim
    assert ours_config["num_attention_heads"] == spec.num_kv_heads
    ours = load_file(folder / "adapter_model.safetensors")
    theirs = load_file(reference / "adapter_model.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}


def test_folder_round_trips_through_the_servers_loader(exported):
    _, model, kv, folder = exported
    assert torch.equal(read_adapter(folder, ModelSpec.from_hf(model)), kv)


def test_peft_reproduces_our_logits_and_greedy_tokens(exported):
    from peft import PeftModel

    make, model, kv, folder = exported
    peft_model = PeftModel.from_pretrained(make(), str(folder)).eval()
    tok = make_byte_tokenizer()
    prompts = [tok(e.prompt)["input_ids"] for e in EXAMPLES]
    assert len(prompts[0]) == len(prompts[1])  # one unpadded batch: positions are P + t in both
    ids = torch.tensor(prompts)
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        ours = forward_with_prefix(model, kv, ids)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    for prompt in prompts:
        x = torch.tensor([prompt])
        with torch.no_grad():
            out = peft_model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=16,
                                      do_sample=False, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.eos_token_id)
        peft_tokens = out[0, len(prompt):].tolist()
        assert peft_tokens == greedy_generate(model, kv, prompt, 16, tok.eos_token_id)
        assert len(peft_tokens) >= 8  # a real comparison, not two empty lists
