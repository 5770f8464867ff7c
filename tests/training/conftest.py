"""Tiny models and a byte-level tokenizer for the trainer tests (no hub access needed)."""

from __future__ import annotations

import pytest
from transformers import GPT2LMHeadModel, LlamaForCausalLM, PreTrainedTokenizerFast

from tests import factories


# A ChatML-like template for the byte tokenizer: each turn ends with the special <eos>.
BYTE_CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
                      "{% if add_generation_prompt %}<assistant>{% endif %}")


def make_byte_tokenizer(chat_template: bool = False) -> PreTrainedTokenizerFast:
    """One token per byte (ids 0-255) plus <eos> (256): a real HF fast tokenizer, offline;
    with `chat_template`, BYTE_CHAT_TEMPLATE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>",
                                   chat_template=BYTE_CHAT_TEMPLATE if chat_template else None)


def make_tiny_llama(seed: int = 0, vocab_size: int = 260, initializer_range: float = 0.2) -> LlamaForCausalLM:
    """tests/factories.tiny_llama (GQA) for the byte tokenizer (<eos> = 256), frozen.

    initializer_range 0.2 (not HF's 0.02): with tiny random weights the logits hardly
    depend on the context, so no prefix could make the model memorize anything.
    """
    return factories.tiny_llama(seed, vocab_size, initializer_range, eos=256).requires_grad_(False)


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_byte_tokenizer()


@pytest.fixture()
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()


def make_tiny_gpt2(seed: int = 0, vocab_size: int = 260) -> GPT2LMHeadModel:
    """tests/factories.tiny_gpt2 (no GQA: PEFT then uses the full heads) for the byte tokenizer, frozen."""
    return factories.tiny_gpt2(seed, vocab_size, initializer_range=0.2, eos=256).requires_grad_(False)


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
