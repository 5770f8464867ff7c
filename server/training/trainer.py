"""Prefix-tuning (Li & Liang 2021) of a frozen HF causal LM: examples in, kv out.

NOTE: the invariants
- The base model is frozen (`requires_grad_(False)`); the only trainable parameters are
  the MLP reparameterization's (reparam.PrefixMLP), which produces the user's kv.
- The forward is HF's own with the prefix as a DynamicCache (prefix_forward.py): keys
  not rotated, real tokens at positions P_total + t. That is exactly how the engine and
  PEFT serve a prefix, so what is trained is what is served.
- With a task prefix, the forward sees cat(task_kv, user_kv) along prefix_len with task_kv
  frozen; serving task ++ user then reproduces training exactly.
- Loss: next-token cross-entropy on completion tokens only (prompt and padding masked),
  averaged over the batch's completion tokens.
- Only the final kv [L, 2, Hkv, P, hd] float32 leaves the trainer; the MLP is dropped.
- Same seed, same examples, same config -> same kv (CPU).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from server.training.data import TokenizedExample
from server.prefix import ModelSpec
from server.training.prefix_forward import forward_with_prefix, prefix_past
from server.training.reparam import PrefixMLP

# (step, total_steps, loss) -> False to stop training (a cancelled job)
ProgressCallback = Callable[[int, int, float], bool]

IGNORE = -100  # label of tokens that are not trained on


@dataclass(frozen=True)
class TrainConfig:
    num_virtual_tokens: int = 10  # P, the prefix length trained
    steps: int = 100  # optimizer steps
    learning_rate: float = 5e-3
    batch_size: int = 8  # examples per step (all of them when there are fewer)
    mid_dim: int = 512  # hidden width of the MLP reparameterization (paper: 512 for table-to-text)
    init_text: str | None = None  # real words to start from; None = the first example's text
    max_length: int = 256  # longest example (prompt + completion + EOS) in tokens
    seed: int = 0
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warmup, then linear decay to 0 at the last step
    max_grad_norm: float | None = 1.0  # gradient clipping; None = off

    def __post_init__(self) -> None:
        def whole(name: str, low: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

        whole("num_virtual_tokens", 1)
        whole("steps", 1)
        whole("batch_size", 1)
        whole("mid_dim", 1)
        whole("max_length", 2)
        whole("seed", 0)
        whole("warmup_steps", 0)
        if self.num_virtual_tokens > self.mid_dim:
            raise ValueError(f"num_virtual_tokens ({self.num_virtual_tokens}) must be <= mid_dim "
                             f"({self.mid_dim}) so the MLP can start at the real-word activations")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be < steps ({self.steps})")
        if not isinstance(self.learning_rate, (int, float)) or not math.isfinite(self.learning_rate) \
                or not 0 < self.learning_rate <= 1:
            raise ValueError(f"learning_rate must be in (0, 1], got {self.learning_rate!r}")
        if not isinstance(self.weight_decay, (int, float)) or not 0 <= self.weight_decay < 1:
            raise ValueError(f"weight_decay must be in [0, 1), got {self.weight_decay!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {self.max_grad_norm!r}")
        if self.init_text is not None and not self.init_text.strip():
            raise ValueError("init_text must not be empty (None = start from the first example)")


@dataclass
class TrainResult:
    kv: torch.Tensor  # [L, 2, Hkv, P, hd] float32 on the CPU: the user's prefix only
    init_kv: torch.Tensor  # [L, 2, Hkv, P, hd] float32: the MLP output at step 0 (real-word init)
    losses: list[float] = field(default_factory=list)  # one per step done
    steps_done: int = 0
    cancelled: bool = False  # the callback asked to stop; kv is then the last step's
    seconds: float = 0.0


def collate(batch: list[TokenizedExample], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Right-padded input_ids, attention_mask and labels [B, T]; labels only on completions."""
    length = max(len(e) for e in batch)
    ids = torch.zeros(len(batch), length, dtype=torch.long)
    mask = torch.zeros(len(batch), length, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE, dtype=torch.long)
    for row, e in enumerate(batch):
        tokens = list(e.prompt_ids) + list(e.completion_ids)
        ids[row, :len(tokens)] = torch.tensor(tokens)
        mask[row, :len(tokens)] = 1
        labels[row, len(e.prompt_ids):len(tokens)] = torch.tensor(e.completion_ids)
    return ids.to(device), mask.to(device), labels.to(device)


def completion_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled tokens. logits [B, T, V], labels [B, T]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


def init_token_ids(config: TrainConfig, examples: list[TokenizedExample], tokenizer) -> list[int]:
    """P real tokens to start from: init_text (or the first example), cut or repeated to P."""
    if config.init_text is not None:
        if tokenizer is None:
            raise ValueError("init_text needs a tokenizer")
        ids = list(tokenizer(config.init_text, add_special_tokens=False)["input_ids"])
    else:
        ids = list(examples[0].prompt_ids) + list(examples[0].completion_ids)
    if not ids:
        raise ValueError(f"init text {config.init_text!r} has no tokens")
    p = config.num_virtual_tokens
    # A short text is repeated: the LM reads it twice, its activations stay real-word ones.
    return (ids * (p // len(ids) + 1))[:p]


def build_prefix_mlp(model: torch.nn.Module, config: TrainConfig, init_kv: torch.Tensor) -> PrefixMLP:
    spec = ModelSpec.from_hf(model)
    mlp = PrefixMLP(config.num_virtual_tokens, spec.num_layers, spec.num_kv_heads, spec.head_dim,
                    embed_dim=model.config.hidden_size, mid_dim=config.mid_dim)
    mlp.fit_output(init_kv)
    return mlp


def train_prefix(
    model: torch.nn.Module,
    examples: list[TokenizedExample],
    config: TrainConfig,
    tokenizer=None,  # needed only for config.init_text
    task_kv: torch.Tensor | None = None,  # [L, 2, Hkv, P_task, hd], frozen, composed before
    progress: ProgressCallback | None = None,
) -> TrainResult:
    """Train a prefix on `examples` with `model` frozen; see the module docstring."""
    if not examples:
        raise ValueError("no examples to train on")
    spec = ModelSpec.from_hf(model)
    device = next(model.parameters()).device
    task_len = 0 if task_kv is None else int(task_kv.shape[3])
    if task_kv is not None and tuple(task_kv.shape) != spec.kv_shape(task_len):
        raise ValueError(f"task prefix has shape {tuple(task_kv.shape)}; the model needs {spec.kv_shape(task_len)}")
    longest = max(len(e) for e in examples)
    if longest > config.max_length:
        raise ValueError(f"an example has {longest} tokens; max_length is {config.max_length}")
    if task_len + config.num_virtual_tokens + longest > spec.max_model_len:
        raise ValueError(f"task prefix ({task_len}) + num_virtual_tokens ({config.num_virtual_tokens}) + "
                         f"longest example ({longest}) exceeds the model's context ({spec.max_model_len})")

    model.requires_grad_(False)
    model.eval()  # no dropout: the frozen model is the serving model
    if task_kv is not None:
        task_kv = task_kv.detach().to(device=device, dtype=torch.float32)

    # The MLP is built on the CPU (then moved), so seeding the CPU generator alone makes the
    # init the same on every device; fork_rng leaves the caller's generator untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        # Real-word init: read after the task prefix, so task ++ init == task then the words.
        init_kv = prefix_past(model, task_kv, init_token_ids(config, examples, tokenizer))
        mlp = build_prefix_mlp(model, config, init_kv.cpu()).to(device)
    order = torch.Generator().manual_seed(config.seed)

    optimizer = torch.optim.AdamW(mlp.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _linear_schedule(config))
    with torch.no_grad():
        start_kv = mlp().float().cpu().contiguous()  # equals init_kv up to float rounding
    result = TrainResult(kv=start_kv, init_kv=start_kv)
    started = time.monotonic()
    batches = _batches(len(examples), min(config.batch_size, len(examples)), order)
    for step in range(1, config.steps + 1):
        ids, mask, labels = collate([examples[i] for i in next(batches)], device)
        kv = mlp()
        if task_kv is not None:
            kv = torch.cat([task_kv, kv], dim=3)
        loss = completion_loss(forward_with_prefix(model, kv, ids, mask), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(mlp.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"loss became {value} at step {step}; lower the learning rate "
                                     f"({config.learning_rate})")
        result.losses.append(value)
        result.steps_done = step
        if progress is not None and progress(step, config.steps, value) is False:
            result.cancelled = True
            break
    with torch.no_grad():
        result.kv = mlp().detach().float().cpu().contiguous()
    result.seconds = time.monotonic() - started
    return result


def _linear_schedule(config: TrainConfig) -> Callable[[int], float]:
    warmup, total = config.warmup_steps, config.steps

    def factor(step: int) -> float:  # step = optimizer steps already taken
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / (total - warmup))

    return factor


def _batches(count: int, size: int, generator: torch.Generator):
    """Endless batches of example indices: a fresh shuffle each epoch, no partial batches."""
    while True:
        perm = torch.randperm(count, generator=generator).tolist()
        for start in range(0, count - size + 1, size):
            yield perm[start:start + size]
