"""The engine as asyncio sees it: submit a request, iterate its outputs, abort it.

The step loop (EngineCore) runs either in an engine process of its own (`AsyncEngine.spawn`,
what serve does) or in a background thread of this process (`AsyncEngine(engine)`, for
tests and embedding). Both are fed the same commands and send the same StepBatch per step.

# NOTE: only the event loop's thread touches the request table (`_sinks`): commands leave
# through a channel, and each step's batch of outputs comes back to the event loop in ONE
# callback (call_soon_threadsafe), which hands every output to its caller's queue. A caller
# that stops iterating (client gone, task cancelled) aborts its request, which frees its
# blocks before the next step. Requests are checked here (check_request against the
# engine's limits) before anything is sent, so a bad request never reaches the loop.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import torch

from server.engine.engine_core import (Abort, AddRequest, ComputeKV, Died, DropStale, EngineCore, PrefixPayload, Ready,
                                       StepBatch, Stop)
from server.engine.classifier import Classification
from server.engine.classifier_core import Classify
from server.engine.engine_process import EngineProcessConfig, SlotsFreed, main as engine_process_main, receive, send
from server.engine.llm_engine import LLMEngine
from server.engine.outputs import EngineStats, RequestOutput
from server.engine.prefix_arena import PrefixArena
from server.engine.request import EngineLimits, check_request
from server.engine.sampling_params import SamplingParams
from server.prefix import ClassifierHead, Prefix, PrefixRef

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the caller should retry later."""


def queue_share(waiting_by_tenant: dict[str, int], tenant: str, max_waiting: int) -> int:
    """How many waiting requests `tenant` may have once the queue holds max_waiting: an
    equal share among the tenants with waiting requests (itself included), at least one
    (none if the queue holds none)."""
    tenants = {t for t, n in waiting_by_tenant.items() if n > 0} | {tenant}
    return max(1, max_waiting // len(tenants)) if max_waiting > 0 else 0


class EngineDeadError(RuntimeError):
    """The step loop crashed (or its process died); requests in flight fail with this."""


class RequestTimeoutError(TimeoutError):
    """The request ran past its timeout; it was aborted."""


class _ThreadChannel:
    """The EngineCore loop in a background thread of this process."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def connect(self) -> Ready:
        e = self.engine
        return Ready(e.limits, str(e.dtype).removeprefix("torch."), str(e.device))

    def start(self, on_batch: Callable[[object], None]) -> None:
        core = EngineCore(self.engine)

        def receive_commands(timeout: float | None) -> list[object]:
            if self._inbox.empty() and timeout:
                self._wake.wait(timeout)
            self._wake.clear()
            out = []
            while True:
                try:
                    out.append(self._inbox.get_nowait())
                except queue.Empty:
                    return out

        def run() -> None:
            try:
                core.run(receive_commands, on_batch)
            except BaseException as e:  # noqa: BLE001 - every waiter must learn the loop died
                log.exception("engine loop crashed")
                on_batch(Died(repr(e)))

        self._thread = threading.Thread(target=run, name="engine-loop", daemon=True)
        self._thread.start()

    def send(self, command: object) -> None:
        self._inbox.put(command)
        self._wake.set()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)


class _ProcessChannel:
    """The EngineCore loop in an engine process (spawned: a clean interpreter, its own GIL),
    a pipe to it, and a reader and a writer thread here so the event loop never blocks on it.
    The writer puts each prefix tensor in a slot of the shared-memory arena (prefix_arena.py)
    and sends the slot; the reader frees slots when the engine says it copied them. With the
    arena full, a tensor goes through the pipe (pickled) instead: nothing waits for room."""

    def __init__(self, config: EngineProcessConfig, start_timeout_s: float = 600.0) -> None:
        self.config = config
        self.start_timeout_s = start_timeout_s
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._proc = None
        self._conn = None
        self.arena: PrefixArena | None = None

    def connect(self) -> Ready:
        """Start the engine process and wait until its model is loaded."""
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        if self.config.arena_bytes > 0:
            self.arena = PrefixArena.create(self.config.arena_bytes)
        self._proc = ctx.Process(target=engine_process_main, name="prefix-serve-engine", daemon=True,
                                 args=(child, self.config, None if self.arena is None else self.arena.name))
        self._proc.start()
        print(f"prefix-serve: engine process started (pid {self._proc.pid})", flush=True)
        child.close()
        self._conn = parent
        try:
            if not parent.poll(self.start_timeout_s):
                self._proc.kill()
                raise EngineDeadError(f"the engine process did not start within {self.start_timeout_s:.0f} s")
            try:
                ready = receive(parent)
            except EOFError as e:
                raise EngineDeadError(f"the engine process exited while starting (code {self._proc.exitcode})") from e
            if not isinstance(ready, Ready):
                raise EngineDeadError(f"the engine process failed to start: {getattr(ready, 'error', ready)}")
        except EngineDeadError:
            self.close_arena()
            raise
        return ready

    def start(self, on_batch: Callable[[object], None]) -> None:
        threading.Thread(target=self._read, args=(on_batch,), name="engine-reader", daemon=True).start()
        threading.Thread(target=self._write, name="engine-writer", daemon=True).start()

    def _read(self, on_batch: Callable[[object], None]) -> None:
        try:
            while True:
                message = receive(self._conn)
                if isinstance(message, SlotsFreed):
                    self._free(message.slot_ids)
                else:
                    on_batch(message)
        except (EOFError, OSError) as e:
            code = self._proc.exitcode if self._proc is not None else None
            on_batch(Died(f"the engine process is gone (exit code {code}; {type(e).__name__})"))

    def _free(self, slot_ids: list[int]) -> None:
        arena = self.arena
        for slot_id in slot_ids:
            try:
                arena.free(slot_id)
            except ValueError:  # a bug, but no reason to stop serving: the slot is lost until shutdown
                log.exception("the engine process freed a slot this process does not know")

    def _write(self) -> None:
        while True:
            command = self._outbox.get()
            try:
                send(self._conn, self._in_arena(command))
            except (OSError, EOFError):
                return
            if isinstance(command, Stop):
                return

    def _in_arena(self, command: object) -> object:
        """The command with its prefix's tensor moved into an arena slot (as it is when the
        arena is full or off)."""
        payload = getattr(command, "prefix", None)
        if self.arena is None or payload is None or payload.kv is None:
            return command
        slot = self.arena.put(payload.kv)
        if slot is None:
            return command
        return replace(command, prefix=replace(payload, kv=None, slot=slot))

    def send(self, command: object) -> None:
        self._outbox.put(command)

    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def join(self, timeout: float) -> None:
        if self._proc is not None:
            self._proc.join(timeout)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
        self.close_arena()

    def close_arena(self) -> None:
        """Unlink the arena (the engine process is gone: nobody reads it any more). It stays
        an object, closed, for a reader or writer thread still holding it."""
        if self.arena is not None and not self.arena.closed:
            self.arena.close()
            self.arena.unlink()


class AsyncEngine:
    def __init__(self, engine: LLMEngine | None = None, max_waiting: int = 256, *,
                 process: EngineProcessConfig | None = None, tokenizer=None) -> None:
        """AsyncEngine(engine): the loop in a thread here. AsyncEngine(process=..., tokenizer=...):
        the loop in an engine process that loads the model itself (serve)."""
        if (engine is None) == (process is None):
            raise ValueError("give an LLMEngine (a thread here) or a process config (an engine process)")
        self._channel = _ThreadChannel(engine) if engine is not None else _ProcessChannel(process)
        self.engine = engine  # the in-process engine (tests look at it); None with an engine process
        self.tokenizer = engine.tokenizer if engine is not None else tokenizer
        self.max_waiting = max_waiting
        self.limits: EngineLimits | None = None
        self.dtype: torch.dtype | None = None
        self.device: str | None = None
        self._sinks: dict[str, asyncio.Queue] = {}
        self._inflight: dict[str, tuple[AddRequest | ComputeKV | Classify, Prefix | None]] = {}  # to send again if the core asks
        self._core_has: set[tuple] = set()  # prefix keys whose tensor the core holds
        self._stats = EngineStats()
        # NOTE: requests sent that the stats do not count yet, by AddRequest.seq. A batch
        # whose stats were taken before the core saw a request can arrive after it was sent:
        # only the core's `added_through` says which sends its stats include.
        self._unseen: OrderedDict[int, str] = OrderedDict()  # seq -> tenant, oldest first
        self._seq = 0
        self._error: str | None = None
        self._started = False

    # ---- lifecycle

    def connect(self) -> None:
        """Blocking: start the engine (process) and learn its limits, spec and dtype. start()
        does it too; serve calls it first because the app is built around the spec."""
        if self.limits is None:
            ready = self._channel.connect()
            self.limits, self.dtype, self.device = ready.limits, getattr(torch, ready.dtype), ready.device

    async def start(self) -> None:
        """Connect if needed, then deliver the loop's outputs to this event loop."""
        if self._started:
            return
        if self.limits is None:
            await asyncio.to_thread(self.connect)
        loop = asyncio.get_running_loop()

        def on_batch(message: object) -> None:  # on the loop's or the reader's thread
            loop.call_soon_threadsafe(self._on_message, message)

        self._channel.start(on_batch)
        self._started = True

    async def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Let running requests finish (up to drain_timeout), then stop the loop."""
        deadline = time.monotonic() + drain_timeout
        while self._sinks and time.monotonic() < deadline and self._error is None:
            await asyncio.sleep(0.05)
        if self._started:
            self._channel.send(Stop())
            await asyncio.to_thread(self._channel.join, 10.0)
        self._started = False

    @property
    def spec(self):
        return self.limits.spec

    @property
    def error(self) -> str | None:
        """Why the step loop died, if it did."""
        return self._error

    @property
    def is_alive(self) -> bool:
        """False once the step loop has died (or before it started)."""
        return self._started and self._error is None and self._channel.alive()

    def stats(self) -> EngineStats:
        return self._stats

    @property
    def arena(self) -> PrefixArena | None:
        """The shared-memory arena prefixes reach the engine process through (None in-process
        or with the arena off); metrics read it."""
        return getattr(self._channel, "arena", None)

    @property
    def num_waiting(self) -> int:
        """Requests that wait for a slot: those waiting at the last step, and those sent since,
        less the slots free at the last step (requests sent into free slots run at the next
        step: when a whole batch finishes at once, its clients' next requests do not wait)."""
        free = 0 if self.limits is None else max(0, self.limits.max_num_seqs - self._stats.num_running)
        return max(0, self._stats.num_waiting + len(self._unseen) - free)

    def waiting_by_tenant(self) -> dict[str, int]:
        """Requests waiting in the engine per tenant (as of the last step, plus those sent
        that its stats do not count yet)."""
        waiting = dict(self._stats.waiting_by_tenant)
        for tenant in self._unseen.values():
            waiting[tenant] = waiting.get(tenant, 0) + 1
        return waiting

    def make_prefix(self, kv: torch.Tensor, refs: tuple[PrefixRef, ...] = (), head: ClassifierHead | None = None,
                    encoder_kv: torch.Tensor | None = None, cross_kv: torch.Tensor | None = None) -> Prefix:
        """Check kv [L, 2, Hkv, P, hd] against the engine's model (once); a host copy in its dtype
        (with a classification prefix's own head, for a seq_cls model; with the encoder and
        cross parts of a three-prefix one, for a seq2seq model)."""
        return Prefix.make(kv, self.limits.spec, refs, self.dtype, head, encoder_kv, cross_kv)

    # ---- requests

    async def generate(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                       prefix: Prefix | None = None, stream: bool = True,
                       timeout_s: float | None = None, tenant: str = "") -> AsyncIterator[RequestOutput]:
        """The request's outputs: deltas as they come (stream) or only the finished one, for
        each of its sampling.n samples (RequestOutput.index); it ends when all n finished.
        `tenant` labels whose it is (the batch is shared fairly between tenants).
        Past `timeout_s` the request is aborted and RequestTimeoutError raised (one timer per
        request, nothing per token). `tenant` labels whose request it is: the engine shares
        the batch fairly between tenants, and once `max_waiting` requests wait, a tenant may
        still queue up to its share of them (QueueFullError beyond it), so one tenant's
        backlog never shuts the others out."""
        if self._error is not None:
            raise EngineDeadError(f"the engine loop stopped: {self._error}")
        if self.limits is None:
            self.connect()
        check_request(self.limits, prompt_token_ids, sampling, prefix)  # raises RequestError
        if self.num_waiting >= self.max_waiting:
            waiting = self.waiting_by_tenant()
            share = queue_share(waiting, tenant, self.max_waiting)
            if waiting.get(tenant, 0) >= share:
                raise QueueFullError(f"{self.num_waiting} requests are already waiting (the queue holds {self.max_waiting}), "
                                     f"{waiting.get(tenant, 0)} of them yours; your share is {share}")
        if request_id in self._sinks:
            raise ValueError(f"request id {request_id!r} is already in use")
        sink: asyncio.Queue = asyncio.Queue()
        self._sinks[request_id] = sink
        self._seq += 1
        add = AddRequest(request_id, list(prompt_token_ids), sampling, self._payload(prefix), time.monotonic(), stream,
                         tenant, self._seq)
        self._inflight[request_id] = (add, prefix)
        self._channel.send(add)
        self._unseen[self._seq] = tenant
        timer = None if timeout_s is None else asyncio.get_running_loop().call_later(
            timeout_s, sink.put_nowait, RequestTimeoutError(f"the request ran longer than {timeout_s:g} s"))
        finished = False
        running = sampling.n  # samples not finished yet
        try:
            while True:
                item = await sink.get()
                if isinstance(item, BaseException):
                    # refused or the engine died: nothing runs; a timeout still runs: abort it
                    finished = not isinstance(item, RequestTimeoutError)
                    raise item
                yield item
                running -= item.finished
                if not running:
                    finished = True
                    return
        finally:
            if timer is not None:
                timer.cancel()
            self._sinks.pop(request_id, None)
            self._inflight.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    async def prompt_kv(self, request_id: str, token_ids: list[int], prefix: Prefix | None = None) -> torch.Tensor:
        """The model's keys and values of `token_ids` (after `prefix`) as a prefix kv
        [L, 2, Hkv, n, hd] (LLMEngine.prompt_kv, run by the loop between two steps)."""
        if self._error is not None:
            raise EngineDeadError(f"the engine loop stopped: {self._error}")
        if self.limits is None:
            self.connect()
        check_request(self.limits, token_ids, SamplingParams(max_tokens=1), prefix)  # raises RequestError
        self._check_free(request_id)
        return await self._one_answer(ComputeKV(request_id, list(token_ids), self._payload(prefix)), prefix)

    async def classify(self, request_id: str, rows: list[list[int]], prefix: Prefix | None = None
                       ) -> list[Classification]:
        """Label probabilities of each row of token ids after `prefix`, from a seq_cls engine
        (server/engine/classifier_core.py), batched there with every request that arrived meanwhile."""
        if self._error is not None:
            raise EngineDeadError(f"the engine loop stopped: {self._error}")
        if self.limits is None:
            self.connect()
        self._check_free(request_id)  # before _payload: it marks the prefix as sent
        return await self._one_answer(Classify(request_id, [list(r) for r in rows], self._payload(prefix)), prefix)

    def _check_free(self, request_id: str) -> None:
        if request_id in self._sinks:
            raise ValueError(f"request id {request_id!r} is already in use")

    async def _one_answer(self, cmd: ComputeKV | Classify, prefix: Prefix | None):
        """Send a command the core answers once (in StepBatch.kvs) and wait for that answer;
        a command sent again with its prefix's tensor if the core asks (need_prefix)."""
        sink: asyncio.Queue = asyncio.Queue()
        self._sinks[cmd.request_id] = sink
        self._inflight[cmd.request_id] = (cmd, prefix)
        self._channel.send(cmd)
        try:
            item = await sink.get()
        finally:
            self._sinks.pop(cmd.request_id, None)
            self._inflight.pop(cmd.request_id, None)
        if isinstance(item, BaseException):
            raise item
        return item

    def abort(self, request_id: str) -> None:
        if self._started:
            self._channel.send(Abort(request_id))

    def drop_stale_prefix(self, tenant: str, prefix_id: str, keep_version: str | None) -> None:
        """A store event said (tenant, prefix_id) changed: drop other versions from the engine
        now, unless a running request still reads them (those go when it finishes, by LRU)."""
        if self._started:
            self._channel.send(DropStale(tenant, prefix_id, keep_version))

    def _payload(self, prefix: Prefix | None, force: bool = False) -> PrefixPayload | None:
        if prefix is None:
            return None
        if prefix.key in self._core_has and not force:
            return PrefixPayload(prefix.key, prefix.refs, None)
        self._core_has.add(prefix.key)
        return PrefixPayload(prefix.key, prefix.refs, prefix.kv, prefix.head, prefix.encoder_kv, prefix.cross_kv)

    # ---- on the event loop: what the core sent

    def _on_message(self, message: object) -> None:
        if isinstance(message, Died):
            self._die(message.error)
            return
        batch: StepBatch = message
        if batch.stats is not None:
            self._stats = batch.stats
            while self._unseen and next(iter(self._unseen)) <= batch.added_through:
                self._unseen.popitem(last=False)
        self._core_has.difference_update(batch.forgotten)
        for request_id in batch.need_prefix:  # the core forgot the prefix meanwhile: send its tensor again
            if request_id in self._inflight:
                cmd, prefix = self._inflight[request_id]
                self._channel.send(replace(cmd, prefix=self._payload(prefix, force=True)))
        for request_id, result in batch.kvs:
            sink = self._sinks.get(request_id)
            if sink is not None:
                sink.put_nowait(result)
        for request_id, error in batch.rejected:
            sink = self._sinks.get(request_id)
            if sink is not None:
                sink.put_nowait(error)
        for out in batch.outputs:
            sink = self._sinks.get(out.request_id)
            if sink is not None:
                sink.put_nowait(out)

    def _die(self, error: str) -> None:
        if self._error is None:
            log.error("the engine loop died: %s", error)
        self._error = error
        for sink in self._sinks.values():
            sink.put_nowait(EngineDeadError(f"engine loop crashed: {error}"))
