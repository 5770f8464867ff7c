"""Prefix-tuning (Li & Liang 2021) of a frozen HF causal LM: examples in, kv out.

NOTE: the invariants
- The base model is frozen (`requires_grad_(False)`); the only trainable parameters are
  the MLP reparameterization's (reparam.PrefixMLP), which produces the user's kv. The MLP,
  AdamW and the losses are float32; the frozen model runs in its own dtype (a bfloat16
  copy trains ~2x faster on CPUs with AMX; see bench/train_speed.py).
- The forward is HF's own with the prefix as a DynamicCache (prefix_forward.py): keys
  not rotated, real tokens at positions P_total + t. That is exactly how the engine and
  PEFT serve a prefix, so what is trained is what is served. A step's sequences are
  packed (packing.py): no padding, shared beginnings once, logits only where a loss is.
- With a task prefix, the forward sees cat(task_kv, user_kv) along prefix_len with task_kv
  frozen; serving task ++ user then reproduces training exactly.
- Loss: next-token cross-entropy on completion tokens only, averaged over the batch's
  completion tokens; plus, with kl_weight > 0, kl_weight times the KL to the frozen base
  model (regularizer.py), averaged over the distinct tokens of the step's sequences (every
  position of the batch's examples, and of `anchors_per_step` extra anchors, cycled) where
  it holds: not at completion tokens the base model gives less than `kl_free_below`.
- With held-out examples, their loss is measured every eval_every steps; the kv returned
  is the one with the lowest held-out loss, and training stops after `patience`
  evaluations without a new best.
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

from server.prefix import ModelSpec
from server.training.data import TokenizedExample
from server.training.packing import pack
from server.training.prefix_forward import forward_packed, prefix_past
from server.training.regularizer import Anchor, BaseTargets, base_targets, kl_to_base, outputs_of
from server.training.reparam import PrefixMLP

# (step, total_steps, loss) -> False to stop training (a cancelled job)
ProgressCallback = Callable[[int, int, float], bool]
# (step, held-out loss) after each evaluation
EvalCallback = Callable[[int, float], None]

IGNORE = -100  # label of tokens that are not trained on


@dataclass(frozen=True)
class TrainConfig:
    num_virtual_tokens: int = 10  # P, the prefix length trained
    steps: int = 100  # optimizer steps (at most: held-out early stopping may end sooner)
    learning_rate: float = 5e-3
    batch_size: int = 8  # examples per step (all of them when there are fewer)
    mid_dim: int = 512  # hidden width of the MLP reparameterization (paper: 512 for table-to-text)
    init_text: str | None = None  # real words to start from; None = the first example's text
    max_length: int = 256  # longest example (prompt + completion + EOS) in tokens
    seed: int = 0
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warmup, then linear decay to 0 at the last step
    max_grad_norm: float | None = 1.0  # gradient clipping; None = off
    eval_every: int = 0  # held-out loss every this many steps (0 = only at the end)
    patience: int = 0  # stop after this many evaluations without a better held-out loss (0 = never)
    kl_weight: float = 0.0  # weight of the KL to the frozen base model (regularizer.py)
    anchors_per_step: int = 4  # extra anchor sequences added to each step (cycled through)
    kl_free_below: float = 0.0  # no KL at a completion token the base model gives less than this (regularizer.py)
    row_tokens: int = 512  # packing: tokens per packed row (longer sequences get a row of their own)
    group_prompts: bool = False  # batches take the examples of one prompt together (computed once)

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
        whole("eval_every", 0)
        whole("patience", 0)
        whole("anchors_per_step", 0)
        whole("row_tokens", 1)
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
        if not isinstance(self.kl_weight, (int, float)) or not math.isfinite(self.kl_weight) or self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight!r}")
        if not isinstance(self.kl_free_below, (int, float)) or not 0 <= self.kl_free_below <= 1:
            raise ValueError(f"kl_free_below must be in [0, 1], got {self.kl_free_below!r}")
        if self.init_text is not None and not self.init_text.strip():
            raise ValueError("init_text must not be empty (None = start from the first example)")


@dataclass
class TrainResult:
    kv: torch.Tensor  # [L, 2, Hkv, P, hd] float32 on the CPU: the user's prefix only
    init_kv: torch.Tensor  # [L, 2, Hkv, P, hd] float32: the MLP output at step 0 (real-word init)
    losses: list[float] = field(default_factory=list)  # training cross-entropy, one per step done
    kl: list[float] = field(default_factory=list)  # KL to the base model, one per step done (with kl_weight > 0)
    steps_done: int = 0
    cancelled: bool = False  # the callback asked to stop; kv is then the last step's (or the best so far)
    seconds: float = 0.0
    held_out: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss); step 0 = the init
    base_held_out_loss: float | None = None  # the frozen model's (after the task prefix) loss on the held-out set
    best_step: int | None = None  # the step whose kv is returned (held-out runs)
    stopped_early: bool = False  # ended by `patience`, before config.steps
    examples_seen: int = 0  # sequences trained on, over all steps
    tokens_computed: int = 0  # packed tokens run forward and backward (anchors included)

    @property
    def best_held_out_loss(self) -> float | None:
        return min((loss for _, loss in self.held_out), default=None)


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
    held_out: list[TokenizedExample] | None = None,  # early stopping and the kv returned (best)
    anchors: list[Anchor] | None = None,  # extra sequences where the KL to the base model holds (kl_weight)
    on_eval: EvalCallback | None = None,
) -> TrainResult:
    """Train a prefix on `examples` with `model` frozen; see the module docstring."""
    if not examples:
        raise ValueError("no examples to train on")
    spec = ModelSpec.from_hf(model)
    device = next(model.parameters()).device
    task_len = 0 if task_kv is None else int(task_kv.shape[3])
    if task_kv is not None and tuple(task_kv.shape) != spec.kv_shape(task_len):
        raise ValueError(f"task prefix has shape {tuple(task_kv.shape)}; the model needs {spec.kv_shape(task_len)}")
    longest = max(len(e) for e in [*examples, *(held_out or [])])
    if longest > config.max_length:
        raise ValueError(f"an example has {longest} tokens; max_length is {config.max_length}")
    if task_len + config.num_virtual_tokens + longest > spec.max_model_len:
        raise ValueError(f"task prefix ({task_len}) + num_virtual_tokens ({config.num_virtual_tokens}) + "
                         f"longest example ({longest}) exceeds the model's context ({spec.max_model_len})")
    # With the regulariser, every position of every example is an anchor too, then the extras.
    anchors = [Anchor(e.prompt_ids + e.completion_ids, 1, learned_from=len(e.prompt_ids)) for e in examples] \
        + list(anchors or []) if config.kl_weight > 0 else []

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
    # The frozen model's work, done once: its distributions at the anchors, its held-out loss.
    targets = base_targets(model, task_kv, anchors, config.row_tokens, free_below=config.kl_free_below) \
        if anchors else None
    best_kv = start_kv
    if held_out:
        result.base_held_out_loss = evaluate_loss(model, task_kv, held_out, config.row_tokens)
        result.held_out.append((0, evaluate_loss(model, _compose(task_kv, start_kv), held_out, config.row_tokens)))
        result.best_step = 0
    batches = _batches(examples, min(config.batch_size, len(examples)), order, config.group_prompts)
    extra_batches = _anchor_batches(len(anchors) - len(examples) if anchors else 0, config.anchors_per_step)
    since_best = 0
    for step in range(1, config.steps + 1):
        batch = next(batches)
        extra = [len(examples) + j for j in next(extra_batches)]
        loss, kl, tokens = _step(model, mlp, task_kv, examples, batch, extra, targets, config)
        optimizer.zero_grad(set_to_none=True)
        (loss if kl is None else loss + config.kl_weight * kl).backward()
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(mlp.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"loss became {value} at step {step}; lower the learning rate "
                                     f"({config.learning_rate})")
        result.losses.append(value)
        if kl is not None:
            result.kl.append(float(kl.detach()))
        result.steps_done = step
        result.examples_seen += len(batch)
        result.tokens_computed += tokens
        if held_out and (step == config.steps or (config.eval_every and step % config.eval_every == 0)):
            with torch.no_grad():
                kv_now = mlp().detach().float().cpu().contiguous()
            held = evaluate_loss(model, _compose(task_kv, kv_now), held_out, config.row_tokens)
            result.held_out.append((step, held))
            if on_eval is not None:
                on_eval(step, held)
            if held < min(loss for _, loss in result.held_out[:-1]):
                best_kv, result.best_step, since_best = kv_now, step, 0
            else:
                since_best += 1
        if progress is not None and progress(step, config.steps, value) is False:
            result.cancelled = True
            break
        if held_out and config.patience and since_best >= config.patience:
            result.stopped_early = step < config.steps
            break
    with torch.no_grad():
        result.kv = best_kv if held_out else mlp().detach().float().cpu().contiguous()
    result.seconds = time.monotonic() - started
    return result


def _step(model, mlp: PrefixMLP, task_kv: torch.Tensor | None, examples: list[TokenizedExample], batch: list[int],
          extra: list[int], targets: BaseTargets | None, config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """One packed forward of the examples `batch` and the extra anchors `extra` (indices into
    targets.anchors): (mean completion cross-entropy, mean KL to the base or None, tokens computed)."""
    sequences = [examples[i].prompt_ids + examples[i].completion_ids for i in batch]
    if targets is not None:
        sequences += [targets.anchors[a].token_ids for a in extra]
    rows = pack(sequences, config.row_tokens)
    outputs, labels = [], []
    for i, index in zip(batch, rows.index):
        start = len(examples[i].prompt_ids)
        outputs += index[start - 1:len(index) - 1]  # the token before each completion token predicts it
        labels += examples[i].completion_ids
    n = len(labels)
    kl_at: dict[int, tuple[int, int]] = {}  # flat index -> (anchor, row of its targets); shared tokens once
    freed: set[int] = set()  # flat indices where a sequence sharing the token learns a change
    if targets is not None:
        for a, index in zip(batch + extra, rows.index):
            for row, flat in enumerate(outputs_of(index, targets.anchors[a])):
                kl_at.setdefault(flat, (a, row))
                if not targets.held[a][row]:
                    freed.add(flat)
    logits = forward_packed(model, _compose(task_kv, mlp()), rows, torch.tensor(outputs + list(kl_at)))
    loss = F.cross_entropy(logits[:n].float(), torch.tensor(labels, device=logits.device))
    kl = None
    if kl_at:
        log_probs = torch.stack([targets.log_probs[a][row] for a, row in kl_at.values()])
        token_ids = torch.stack([targets.token_ids[a][row] for a, row in kl_at.values()])
        held = torch.tensor([flat not in freed for flat in kl_at])
        kl = kl_to_base(logits[n:], log_probs, token_ids, held)
    return loss, kl, rows.num_tokens


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, kv: torch.Tensor | None, examples: list[TokenizedExample],
                  row_tokens: int = 512, chunk: int = 32) -> float:
    """Mean completion cross-entropy (per token, as training) of the model with prefix `kv`."""
    total, count = 0.0, 0
    for start in range(0, len(examples), chunk):
        part = examples[start:start + chunk]
        rows = pack([e.prompt_ids + e.completion_ids for e in part], row_tokens)
        outputs, labels = [], []
        for e, index in zip(part, rows.index):
            outputs += index[len(e.prompt_ids) - 1:len(index) - 1]
            labels += e.completion_ids
        logits = forward_packed(model, kv, rows, torch.tensor(outputs)).float()
        total += float(F.cross_entropy(logits, torch.tensor(labels, device=logits.device), reduction="sum"))
        count += len(labels)
    return total / count


def _compose(task_kv: torch.Tensor | None, kv: torch.Tensor) -> torch.Tensor:
    return kv if task_kv is None else torch.cat([task_kv, kv.to(task_kv.device)], dim=3)


def _linear_schedule(config: TrainConfig) -> Callable[[int], float]:
    warmup, total = config.warmup_steps, config.steps

    def factor(step: int) -> float:  # step = optimizer steps already taken
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / (total - warmup))

    return factor


def _batches(examples: list[TokenizedExample], size: int, generator: torch.Generator, group_prompts: bool):
    """Endless batches of example indices: a fresh shuffle each epoch, no partial batches.

    With group_prompts, the examples of one prompt follow each other in the shuffled order
    (groups shuffled, and the examples inside each), so a batch holds few prompts and
    packing computes each once."""
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, e in enumerate(examples):
        by_prompt.setdefault(e.prompt_ids, []).append(i)
    groups = list(by_prompt.values())
    while True:
        if group_prompts:
            perm = []
            for g in torch.randperm(len(groups), generator=generator).tolist():
                group = groups[g]
                perm += [group[j] for j in torch.randperm(len(group), generator=generator).tolist()]
        else:
            perm = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(perm) - size + 1, size):
            yield perm[start:start + size]


def _anchor_batches(count: int, size: int):
    """Endless runs of `size` anchor indices, cycling through all of them in order."""
    if count == 0 or size == 0:
        while True:
            yield []
    position = 0
    while True:
        yield [(position + k) % count for k in range(min(size, count))]
        position = (position + size) % count
