"""The engine's step loop behind a command channel: the main loop of serve's engine process
(server/engine/engine_process.py), and of the in-process thread that tests use.

    loop: apply the commands that arrived (add, abort, drop stale prefixes, stop)
          outputs = engine.step()
          send one StepBatch: every output of the step, the stats, what was forgotten

# NOTE: the loop runs on the main thread of its own process in serve: a step whose torch
# ops run on a non-main thread was measured 36% slower (OpenMP thread teams), and the API's
# event loop no longer shares a GIL with the step's Python. Everything crossing the channel
# is a small picklable dataclass below; a prefix's tensor crosses once (between processes in
# a shared-memory slot, prefix_arena.py, not in the pickle), and the core keeps it
# (server/engine/prefix_lru.py, within `host_prefix_bytes`) until it reports the key as
# forgotten.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import torch

from server.engine.guided_decoding import PendingCompiles
from server.engine.llm_engine import LLMEngine
from server.engine.outputs import EngineStats, FinishReason, RequestOutput
from server.engine.prefix_arena import ArenaSlot
from server.engine.prefix_lru import PrefixLRU
from server.engine.request import EngineLimits
from server.engine.sampling_params import SamplingParams
from server.prefix import ClassifierHead, Prefix, PrefixRef

log = logging.getLogger(__name__)


# ---- commands to the core

@dataclass
class PrefixPayload:
    key: tuple  # Prefix.key
    refs: tuple[PrefixRef, ...]
    kv: torch.Tensor | None  # None: the core has this key already (or it is in `slot`)
    head: ClassifierHead | None = None  # a classification prefix's own head (seq_cls models)
    encoder_kv: torch.Tensor | None = None  # Prefix.encoder_kv (seq2seq three-prefix form)
    cross_kv: torch.Tensor | None = None  # Prefix.cross_kv (seq2seq three-prefix form)
    # Between the processes only: where kv lies in the shared-memory arena instead of in the
    # message (the engine process puts it back into `kv` before the core sees the command).
    slot: ArenaSlot | None = None


@dataclass
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    prefix: PrefixPayload | None
    arrival_time: float
    stream: bool = True  # False: only the finished output is sent (one message per request)
    tenant: str = ""  # whose request (fair scheduling between tenants)
    seq: int = 0  # the sender's count of AddRequests: StepBatch.added_through echoes it


@dataclass
class ComputeKV:
    """The keys and values of `token_ids` (after `prefix`): LLMEngine.prompt_kv, between steps."""

    request_id: str
    token_ids: list[int]
    prefix: PrefixPayload | None


@dataclass
class Abort:
    request_id: str


@dataclass
class DropStale:
    tenant: str
    prefix_id: str
    keep_version: str | None


@dataclass
class Stop:
    pass


# ---- what the core sends back

@dataclass
class Ready:
    limits: EngineLimits
    dtype: str  # torch dtype name of the engine: prefixes are cast to it
    device: str


@dataclass
class StepBatch:
    outputs: list[RequestOutput] = field(default_factory=list)
    stats: EngineStats | None = None
    rejected: list[tuple[str, BaseException]] = field(default_factory=list)  # (request id, why) at add time
    need_prefix: list[str] = field(default_factory=list)  # request ids to send again with their prefix's kv
    forgotten: list[tuple] = field(default_factory=list)  # prefix keys the core no longer holds
    kvs: list[tuple[str, torch.Tensor | BaseException]] = field(default_factory=list)  # ComputeKV results
    added_through: int = 0  # the seq of the last AddRequest applied before `stats` was taken


@dataclass
class Died:
    error: str


class EngineCore:
    def __init__(self, engine: LLMEngine, host_prefix_bytes: int = 1 << 30) -> None:
        self.engine = engine
        self.prefixes = PrefixLRU(engine.spec, host_prefix_bytes)  # host copies
        self._prefix_of: dict[str, tuple] = {}  # request id -> its prefix key (pinned in `prefixes`)
        self._quiet: dict[str, dict[int, RequestOutput]] = {}  # non-streaming requests: each sample so far
        self._batch = StepBatch()
        self._added_through = 0  # the seq of the last AddRequest applied
        # structured output: requests whose pattern compiles on a thread, off the step loop
        self._compiling = PendingCompiles(engine.guides)
        self.stopped = False

    # ---- commands

    def apply(self, commands: Iterable[object]) -> None:
        for cmd in commands:
            if isinstance(cmd, AddRequest):
                self._add(cmd)
            elif isinstance(cmd, ComputeKV):
                self._compute_kv(cmd)
            elif isinstance(cmd, Abort):
                self._compiling.discard(cmd.request_id)
                self._quiet.pop(cmd.request_id, None)
                self.engine.abort(cmd.request_id)
                self._release(cmd.request_id)
            elif isinstance(cmd, DropStale):
                self.engine.kv.prefixes.drop_stale(cmd.tenant, cmd.prefix_id, cmd.keep_version)
                self.prefixes.forget_stale(cmd.tenant, cmd.prefix_id, cmd.keep_version,
                                           set(self._prefix_of.values()))
            elif isinstance(cmd, Stop):
                self.stopped = True

    def _add(self, cmd: AddRequest) -> None:
        self._added_through = max(self._added_through, cmd.seq)
        if self._compiling.defer(cmd):
            return
        ready, prefix = self._command_prefix(cmd)
        if not ready:
            return
        try:
            self.engine.add_request(cmd.request_id, cmd.prompt_token_ids, cmd.sampling, prefix, cmd.arrival_time,
                                    cmd.tenant)
        except Exception as e:  # noqa: BLE001 - the caller learns why; the loop goes on
            self._batch.rejected.append((cmd.request_id, e))
            return
        if prefix is not None:
            self._prefix_of[cmd.request_id] = prefix.key
        if not cmd.stream:
            self._quiet[cmd.request_id] = {}

    def _compute_kv(self, cmd: ComputeKV) -> None:
        ready, prefix = self._command_prefix(cmd)
        if not ready:
            return
        try:
            self._batch.kvs.append((cmd.request_id, self.engine.prompt_kv(cmd.token_ids, prefix)))
        except Exception as e:  # noqa: BLE001 - the caller learns why; the loop goes on
            self._batch.kvs.append((cmd.request_id, e))

    def _command_prefix(self, cmd: AddRequest | ComputeKV) -> tuple[bool, Prefix | None]:
        """(ready, the prefix or None) for a command; not ready: this core forgot the prefix's
        tensor, and the API is asked (need_prefix) to send the command again with it."""
        if cmd.prefix is None:
            return True, None
        prefix = self.prefixes.get(cmd.prefix, set(self._prefix_of.values()))
        if prefix is None:
            self._batch.need_prefix.append(cmd.request_id)
            return False, None
        return True, prefix

    def _release(self, request_id: str) -> None:
        self._prefix_of.pop(request_id, None)

    # ---- the loop

    def _add_compiled(self) -> None:
        """Add the requests whose pattern has compiled (or reject them, saying why)."""
        self._compiling.drain(self._add, lambda request_id, e: self._batch.rejected.append((request_id, e)))

    def step(self) -> StepBatch:
        """Run one step (if there is work) and return everything to send for it."""
        if self._compiling:
            self._add_compiled()
        if self.engine.has_unfinished():
            for out in self.engine.step():
                self._emit(out)
        batch, self._batch = self._batch, StepBatch()
        batch.forgotten = self.prefixes.take_forgotten()
        batch.stats = self.engine.stats()
        batch.added_through = self._added_through
        return batch

    def _emit(self, out: RequestOutput) -> None:
        done = out.request_id not in self.engine.requests  # every sample of it finished
        if done:
            self._release(out.request_id)
        if out.request_id not in self._quiet:
            self._batch.outputs.append(out)
            return
        # a non-streaming request: keep adding each sample's deltas up, send each sample
        # when it finishes
        samples = self._quiet[out.request_id]
        merged = _merge(samples.pop(out.index), out) if out.index in samples else out
        if out.finished:
            self._batch.outputs.append(merged)
        else:
            samples[out.index] = merged
        if done and not samples:  # the last sample's output is out
            del self._quiet[out.request_id]

    def run(self, receive: Callable[[float | None], list[object]], send: Callable[[StepBatch], None],
            idle_wait_s: float = 0.5) -> None:
        """Until Stop: commands in, one batch out per step. `receive(timeout)` returns the
        commands that arrived (waiting up to `timeout` for the first; None = forever)."""
        while not self.stopped:
            busy = self.engine.has_unfinished()
            self.apply(receive(0.0 if busy else 0.005 if self._compiling else idle_wait_s))
            if self.stopped:
                break
            batch = self.step()
            if busy or batch.outputs or batch.rejected or batch.need_prefix or batch.forgotten or batch.kvs:
                send(batch)
        self._compiling.shutdown()


def _merge(before: RequestOutput, after: RequestOutput) -> RequestOutput:
    """One output that says what `before` and then `after` said."""
    logprobs = None if after.logprobs is None else (before.logprobs or []) + after.logprobs
    return replace(after, new_token_ids=before.new_token_ids + after.new_token_ids,
                   new_text=before.new_text + after.new_text, logprobs=logprobs,
                   prompt_logprobs=before.prompt_logprobs or after.prompt_logprobs)


def finished_as_error(request_id: str, error: str) -> RequestOutput:
    """The output a caller gets for a request the engine could not finish."""
    return RequestOutput(request_id=request_id, new_token_ids=[], new_text="", finished=True,
                         finish_reason=FinishReason.ERROR, error=error, arrival_time=time.monotonic())
