"""Tiny models, PEFT prefix adapters and reference forwards, shared by the tests."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.prefix import ModelSpec, Prefix
from server.prefix.peft_format import read_adapter
from server.training.prefix_forward import cache_argument, prefix_dynamic_cache


def tiny_llama(seed: int = 0, vocab: int = 320, initializer_range: float = 0.02, eos: int = 2,
               max_positions: int = 256) -> LlamaForCausalLM:
    """2 layers, hidden 64, 4 query heads sharing 2 KV heads (GQA), float32."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=max_positions,
                      initializer_range=initializer_range, bos_token_id=1, eos_token_id=eos,
                      pad_token_id=eos if eos != 2 else 0, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0, vocab: int = 320, initializer_range: float = 0.02, eos: int = 2) -> GPT2LMHeadModel:
    """2 layers, hidden 64, 4 heads, float32."""
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=vocab, n_positions=256,
                     initializer_range=initializer_range, bos_token_id=1, eos_token_id=eos,
                     pad_token_id=eos if eos != 2 else None)
    return GPT2LMHeadModel(cfg).eval()


def make_engine(model, num_blocks: int = 64, block_size: int = 4, tokenizer=None, **kw) -> LLMEngine:
    return LLMEngine(model, tokenizer, EngineConfig(block_size=block_size, num_blocks=num_blocks, **kw))


def peft_prefix_model(base, num_virtual_tokens: int, prefix_projection: bool = False, seed: int = 0):
    """A PeftModel with a randomised prefix (PEFT initialises the embedding at random)."""
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    torch.manual_seed(seed)
    cfg = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=num_virtual_tokens,
                             prefix_projection=prefix_projection, encoder_hidden_size=32)
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():  # make the prefix large enough to matter
        for p in peft_model.prompt_encoder.parameters():
            p.mul_(3.0)
    return peft_model.eval()


def save_and_load_prefix(peft_model, spec: ModelSpec) -> torch.Tensor:
    """Save the adapter the way users do and read it back with prefix-serve's loader."""
    with tempfile.TemporaryDirectory() as d:
        peft_model.save_pretrained(d)
        return read_adapter(Path(d), spec)


def random_prefix(engine: LLMEngine, length: int, seed: int) -> Prefix:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(engine.spec.kv_shape(length), generator=g)
    return engine.make_prefix(kv)


def hf_prefix_logits(base, kv: torch.Tensor | None, ids: list[int]) -> torch.Tensor:
    """The oracle: HF's own forward with the prefix as a fresh KV cache (keys unrotated)."""
    x = torch.tensor([ids])
    if kv is None:
        return base(x).logits[0]
    p = kv.shape[3]
    cache = DynamicCache()
    for layer in range(kv.shape[0]):
        cache.update(kv[layer, 0][None].clone(), kv[layer, 1][None].clone(), layer)
    mask = torch.ones(1, p + len(ids), dtype=torch.long)
    pos = torch.arange(p, p + len(ids))[None]
    return base(x, attention_mask=mask, position_ids=pos, **cache_argument(base, cache)).logits[0]


def hf_greedy(base, kv: torch.Tensor | None, ids: list[int], n: int) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        out.append(int(hf_prefix_logits(base, kv, ids + out)[-1].argmax()))
    return out


def tiny_qwen2(seed: int = 0, vocab: int = 320):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, use_sliding_window=False)
    return Qwen2ForCausalLM(cfg).eval()


def tiny_qwen3(seed: int = 0, vocab: int = 320):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=vocab, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, use_sliding_window=False)
    return Qwen3ForCausalLM(cfg).eval()


@torch.no_grad()
def greedy_generate(model, kv: torch.Tensor | None, prompt_ids: list[int], max_tokens: int,
                    eos_token_id: int | None = None) -> list[int]:
    """Greedy tokens after `prompt_ids` with prefix kv [L, 2, Hkv, P, hd] (or None), by HF's
    own forward with the prefix as its cache: a test oracle."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    prefix_len = 0 if kv is None else kv.shape[3]
    cache = DynamicCache() if kv is None else prefix_dynamic_cache(kv.to(device, dtype), 1)
    ids = torch.tensor([prompt_ids], device=device)
    start = prefix_len
    out: list[int] = []
    for _ in range(max_tokens):
        n = ids.shape[1]
        mask = torch.ones(1, start + n, dtype=torch.long, device=device)
        positions = torch.arange(start, start + n, device=device).unsqueeze(0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                       **cache_argument(model, cache)).logits
        token = int(logits[0, -1].argmax())
        out.append(token)
        if token == eos_token_id:
            break
        start += n
        ids = torch.tensor([[token]], device=device)
    return out
