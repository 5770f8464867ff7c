"""Drives an LLMEngine from asyncio: the step loop runs in one background thread.

# NOTE: the engine itself is single-threaded. Only the loop thread touches it; callers
# hand it commands (add, abort) through an inbox that the loop drains before each step,
# and outputs travel back to each caller's asyncio.Queue with call_soon_threadsafe.
# A caller that stops iterating (client gone, task cancelled) aborts its request, which
# frees its blocks before the next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from server.engine.llm_engine import LLMEngine
from server.engine.outputs import EngineStats, RequestOutput
from server.prefix import Prefix
from server.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the caller should retry later."""


class EngineDeadError(RuntimeError):
    """The step loop crashed; requests in flight fail with this."""


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    prefix: Prefix | None
    sink: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    arrival_time: float


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int = 256) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._sinks: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}
        self._pending = 0  # added by callers, not yet seen by the loop thread
        self._lock = threading.Lock()
        self._stats = engine.stats()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._error: BaseException | None = None

    async def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
            self._thread.start()

    async def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Let running requests finish (up to drain_timeout), then stop the loop."""
        deadline = time.monotonic() + drain_timeout
        while self._sinks and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)
            self._thread = None

    def stats(self) -> EngineStats:
        return self._stats

    @property
    def num_waiting(self) -> int:
        s = self._stats
        return s.num_waiting + self._pending

    async def generate(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                       prefix: Prefix | None = None) -> AsyncIterator[RequestOutput]:
        if self._error is not None:
            raise EngineDeadError(f"the engine loop stopped: {self._error!r}")
        self.engine.check_request(prompt_token_ids, sampling, prefix)  # pure: raises ValueError
        with self._lock:
            if self._stats.num_waiting + self._pending >= self.max_waiting:
                raise QueueFullError(f"{self.max_waiting} requests are already waiting")
            self._pending += 1
        sink: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._inbox.put(_Add(request_id, prompt_token_ids, sampling, prefix, sink, loop, time.monotonic()))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await sink.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def drop_stale_prefix(self, tenant: str, prefix_id: str, keep_version: str | None) -> None:
        """A store event said (tenant, prefix_id) changed: evict other versions from the pool
        now, unless a running request still reads them (those go when it finishes, by LRU)."""
        self._inbox.put(("drop_stale", (tenant, prefix_id, keep_version)))
        self._wake.set()

    @property
    def error(self) -> BaseException | None:
        """What killed the step loop, if it died."""
        return self._error

    @property
    def is_alive(self) -> bool:
        """False once the step loop has crashed (or was never started)."""
        return self._error is None and self._thread is not None and self._thread.is_alive()

    # ---- the loop thread --------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._drain_inbox()
                if not self.engine.has_unfinished():
                    self._stats = self.engine.stats()
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                outputs = self.engine.step()
                self._stats = self.engine.stats()
                for out in outputs:
                    self._deliver(out)
        except BaseException as e:  # noqa: BLE001 - every waiter must learn the loop died
            log.exception("engine loop crashed")
            self._error = e
            for sink, loop in list(self._sinks.values()):
                loop.call_soon_threadsafe(sink.put_nowait, EngineDeadError(f"engine loop crashed: {e!r}"))
            self._sinks.clear()

    def _drain_inbox(self) -> None:
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Add):
                with self._lock:
                    self._pending -= 1
                try:
                    self.engine.add_request(cmd.request_id, cmd.prompt_token_ids, cmd.sampling, cmd.prefix,
                                            arrival_time=cmd.arrival_time)
                    self._sinks[cmd.request_id] = (cmd.sink, cmd.loop)
                except Exception as e:  # noqa: BLE001 - hand the error to its caller
                    cmd.loop.call_soon_threadsafe(cmd.sink.put_nowait, e)
            elif cmd[0] == "drop_stale":
                self.engine.kv.prefixes.drop_stale(*cmd[1])
            else:
                _, request_id = cmd
                self.engine.abort(request_id)
                self._sinks.pop(request_id, None)

    def _deliver(self, out: RequestOutput) -> None:
        target = self._sinks.get(out.request_id)
        if target is None:
            return
        if out.finished:
            del self._sinks[out.request_id]
        sink, loop = target
        loop.call_soon_threadsafe(sink.put_nowait, out)
