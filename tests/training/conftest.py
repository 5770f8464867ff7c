"""Tiny models and a byte-level tokenizer for the trainer tests (no hub access needed)."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


def make_byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte (ids 0-255) plus <eos> (256): a real HF fast tokenizer, offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>")


def make_tiny_llama(seed: int = 0, vocab_size: int = 260, initializer_range: float = 0.2) -> LlamaForCausalLM:
    """2 layers, hidden 64, 4 query heads sharing 2 KV heads (GQA), float32, frozen.

    initializer_range 0.2 (not HF's 0.02): with tiny random weights the logits hardly
    depend on the context, so no prefix could make the model memorize anything.
    """
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=256,
                         initializer_range=initializer_range, eos_token_id=256, bos_token_id=None, pad_token_id=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).float().eval()
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_byte_tokenizer()


@pytest.fixture()
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()


def make_tiny_gpt2(seed: int = 0, vocab_size: int = 260) -> GPT2LMHeadModel:
    """2 layers, hidden 64, 4 heads (no GQA: PEFT then uses the full heads), float32, frozen."""
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=vocab_size, n_positions=256,
                        initializer_range=0.2, bos_token_id=256, eos_token_id=256, pad_token_id=256)
    model = GPT2LMHeadModel(config).float().eval()
    model.requires_grad_(False)
    return model


# Two prompts that differ only in a name: the prefix must read the prompt to answer.
# Four words each, so BLEU (up to 4-grams) of an exact answer is 100.
MEMORY_EXAMPLES = [("name: Ada\nsays:", " hi to you all"), ("name: Bob\nsays:", " good night my dear")]


@pytest.fixture(scope="session")
def task_then_user():
    """A user prefix trained on top of a frozen task prefix (real words) until it memorizes.

    Returns (model, tokenizer, tokenized examples, task_kv, TrainResult of the user part).
    """
    from server.training.data import Example, tokenize
    from server.training.prefix_forward import prefix_past
    from server.training.trainer import TrainConfig, train_prefix

    tok = make_byte_tokenizer()
    model = make_tiny_llama()
    data = tokenize(tok, [Example(p, c) for p, c in MEMORY_EXAMPLES], 64)
    task_kv = prefix_past(model, None, tok("task: greet\n", add_special_tokens=False)["input_ids"])
    config = TrainConfig(num_virtual_tokens=8, steps=150, learning_rate=2e-2, batch_size=2, mid_dim=64)
    return model, tok, data, task_kv, train_prefix(model, data, config, tokenizer=tok, task_kv=task_kv)
