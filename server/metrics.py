"""Prometheus metrics: every metric family of prefix-serve is declared here, and this is
the only module that imports prometheus_client.

Two kinds of families:
- *pushed*: observed as things happen (an HTTP request ends, a generation finishes, a
  prefix is loaded from the store, a training job ends);
- *snapshot*: read at scrape time from plain-number snapshots of the parts that own them
  (`AsyncEngine.stats()` -> EngineStats, the host prefix cache, the store's error count,
  a job-count function), so the engine never knows Prometheus exists.

Labels are `tenant`, `route` (the route template, e.g. `/v1/prefixes/{prefix_id}`, never
the raw path), `status` (HTTP status code, or a training job status) and, for histograms,
`le`. No label takes values that grow with prefix ids, users or requests.

All names start with `prefix_serve_`. Counters end in `_total` when exposed.

| family                                        | type      | labels               | source |
|-----------------------------------------------|-----------|----------------------|--------|
| http_requests_total                           | counter   | route, status, tenant| middleware |
| http_request_duration_seconds                 | histogram | route                | middleware (whole response, streams included) |
| e2e_request_latency_seconds                   | histogram |                      | finished generation: engine arrival -> last token |
| time_to_first_token_seconds                   | histogram |                      | finished generation: engine arrival -> first token |
| time_per_output_token_seconds                 | histogram |                      | finished generation: (last - first token) / (n - 1) |
| prompt_tokens_total                           | counter   | tenant               | finished generation (prompt length, prefix excluded) |
| generation_tokens_total                       | counter   | tenant               | finished generation |
| prefix_load_seconds                           | histogram |                      | resolver: fetch from the store + validate |
| training_jobs_finished_total                  | counter   | status               | record_job() |
| training_job_duration_seconds                 | histogram | status               | record_job() |
| num_requests_running / num_requests_waiting   | gauge     |                      | EngineStats (+ requests not yet seen by the loop) |
| kv_blocks_total / _free / _used / _prefix     | gauge     |                      | EngineStats (_prefix: blocks held by resident prefixes) |
| preemptions_total                             | counter   |                      | EngineStats |
| engine_steps_total                            | counter   |                      | EngineStats |
| engine_scheduled_tokens_total / _requests_total | counter |                      | EngineStats (per step = rate / rate(steps)) |
| engine_last_step_tokens / _requests           | gauge     |                      | EngineStats |
| engine_prompt_tokens_total                    | counter   |                      | EngineStats (prefill computed, recompute included) |
| engine_generation_tokens_total                | counter   |                      | EngineStats |
| device_prefixes / device_prefix_bytes         | gauge     |                      | EngineStats (prefixes with blocks in the KV pool) |
| device_prefix_cache_{hits,misses,evictions}_total | counter |                    | EngineStats |
| host_prefixes / host_prefix_bytes             | gauge     |                      | host prefix cache (validated tensors in RAM) |
| host_prefix_cache_{hits,misses,evictions}_total | counter |                      | host prefix cache |
| prefix_arena_bytes / _used_bytes / _slots     | gauge     |                      | the prefix arena (shared memory from the API process to the engine process) |
| prefix_arena_{puts,fallbacks}_total           | counter   |                      | the prefix arena (fallbacks: it was full, the tensor went through the pipe) |
| store_errors_total                            | counter   |                      | store: operations that found Redis unreachable |
| training_jobs                                 | gauge     | status               | job-count snapshot function |
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.engine.outputs import EngineStats, RequestOutput

log = logging.getLogger(__name__)

NAMESPACE = "prefix_serve"
# 1 ms (a GPU decode step of a small model) to 120 s (a long CPU generation), ~2.5x apart.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 20.0, 40.0, 80.0, 120.0)
JOB_DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
                        7200.0, 14400.0)
UNMATCHED_ROUTE = "unmatched"  # 404s for unknown paths, and bodies refused before routing
TENANT_STATE_KEY = "tenant"  # request.state.tenant, set by authentication
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")  # prefix_store.job.JobStatus


class ArenaView(Protocol):
    """What the prefix arena (server.engine.prefix_arena.PrefixArena) shows to metrics."""

    capacity: int
    used_bytes: int
    puts: int
    fallbacks: int

    def __len__(self) -> int: ...


class HostCacheView(Protocol):
    """What the host prefix LRU (server.api.host_prefixes.HostPrefixes) shows to metrics."""

    nbytes: int
    hits: int
    misses: int
    evictions: int

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class _Family:
    name: str  # without namespace; counters without `_total`
    kind: str  # "gauge" | "counter"
    doc: str
    read: Callable  # snapshot -> number


_ENGINE_FAMILIES = (
    _Family("num_requests_running", "gauge", "Requests in the engine's running batch.", lambda s: s.num_running),
    _Family("kv_blocks_total", "gauge", "Blocks in the paged KV pool.", lambda s: s.kv_blocks_total),
    _Family("kv_blocks_free", "gauge", "Free blocks in the KV pool.", lambda s: s.kv_blocks_free),
    _Family("kv_blocks_used", "gauge", "Blocks in use (requests and resident prefixes).",
            lambda s: s.kv_blocks_total - s.kv_blocks_free),
    _Family("kv_blocks_prefix", "gauge", "Blocks held by prefixes resident on the device.",
            lambda s: s.kv_blocks_used_by_prefixes),
    _Family("device_prefixes", "gauge", "Prefixes resident in the device KV pool.", lambda s: s.prefixes_resident),
    _Family("device_prefix_bytes", "gauge", "Bytes of the prefixes resident in the device KV pool.",
            lambda s: s.prefixes_resident_bytes),
    _Family("device_prefix_cache_hits", "counter", "Requests whose prefix was already resident on the device.",
            lambda s: s.prefix_hits),
    _Family("device_prefix_cache_misses", "counter", "Requests whose prefix had to be copied into the KV pool.",
            lambda s: s.prefix_misses),
    _Family("device_prefix_cache_evictions", "counter", "Prefixes evicted from the KV pool to make room.",
            lambda s: s.prefix_evictions),
    _Family("preemptions", "counter", "Running requests preempted (blocks freed, recomputed later).",
            lambda s: s.preemptions),
    _Family("engine_steps", "counter", "Engine steps (one packed forward each).", lambda s: s.steps),
    _Family("engine_scheduled_tokens", "counter", "Tokens scheduled over all steps.", lambda s: s.scheduled_tokens),
    _Family("engine_scheduled_requests", "counter", "Requests scheduled over all steps (summed per step).",
            lambda s: s.scheduled_requests),
    _Family("engine_last_step_tokens", "gauge", "Tokens in the last engine step.", lambda s: s.last_step_tokens),
    _Family("engine_last_step_requests", "gauge", "Requests in the last engine step.",
            lambda s: s.last_step_requests),
    _Family("engine_prompt_tokens", "counter", "Prompt tokens computed by prefill (recomputation included).",
            lambda s: s.prompt_tokens),
    _Family("engine_generation_tokens", "counter", "Tokens sampled by the engine.", lambda s: s.generated_tokens),
)
_WAITING = _Family("num_requests_waiting", "gauge", "Requests admitted and waiting for a slot in the batch.",
                   lambda n: n)
_HOST_FAMILIES = (
    _Family("host_prefixes", "gauge", "Validated prefixes kept in host memory.", len),
    _Family("host_prefix_bytes", "gauge", "Bytes of the prefixes kept in host memory.", lambda c: c.nbytes),
    _Family("host_prefix_cache_hits", "counter", "Prefix lookups served from host memory.", lambda c: c.hits),
    _Family("host_prefix_cache_misses", "counter", "Prefix lookups not in host memory.", lambda c: c.misses),
    _Family("host_prefix_cache_evictions", "counter", "Prefixes evicted from host memory (LRU).",
            lambda c: c.evictions),
)
_ARENA_FAMILIES = (
    _Family("prefix_arena_bytes", "gauge", "Size of the shared-memory arena that hands prefixes to the engine process.",
            lambda a: a.capacity),
    _Family("prefix_arena_used_bytes", "gauge", "Bytes of the arena in slots the engine has not copied out yet.",
            lambda a: a.used_bytes),
    _Family("prefix_arena_slots", "gauge", "Arena slots the engine has not copied out yet.", len),
    _Family("prefix_arena_puts", "counter", "Prefix tensors handed to the engine through the arena.",
            lambda a: a.puts),
    _Family("prefix_arena_fallbacks", "counter",
            "Prefix tensors that found the arena full and went through the pipe (pickled) instead.",
            lambda a: a.fallbacks),
)
_STORE_ERRORS = _Family("store_errors", "counter", "Store operations that found Redis unreachable.", lambda n: n)
_JOBS = _Family("training_jobs", "gauge", "Personalization jobs by status (from the job queue).", lambda n: n)


def _empty(f: _Family, labels: Iterable[str] = ()) -> Metric:
    cls = GaugeMetricFamily if f.kind == "gauge" else CounterMetricFamily
    return cls(f"{NAMESPACE}_{f.name}", f.doc, labels=list(labels))


def _single(f: _Family, source: object) -> Metric:
    metric = _empty(f)
    metric.add_metric([], float(f.read(source)))
    return metric


class _SnapshotCollector(Collector):
    """Reads the registered snapshot sources at every scrape. A failing source is logged
    and left out of that scrape: one broken part must not blank the whole page."""

    def __init__(self, metrics: "Metrics") -> None:
        self._m = metrics

    def describe(self) -> list[Metric]:
        families = [*_ENGINE_FAMILIES, _WAITING, *_HOST_FAMILIES, *_ARENA_FAMILIES, _STORE_ERRORS]
        return [_empty(f) for f in families] + [_empty(_JOBS, ["status"])]

    def collect(self) -> Iterable[Metric]:
        m = self._m
        out: list[Metric] = []
        if m._engine_stats is not None:
            self._guarded(out, "engine", lambda: self._engine(m._engine_stats(), m._engine_waiting))
        if m._host_cache is not None:
            self._guarded(out, "host cache", lambda: [_single(f, m._host_cache) for f in _HOST_FAMILIES])
        if m._arena is not None:
            self._guarded(out, "prefix arena", lambda: [_single(f, m._arena) for f in _ARENA_FAMILIES])
        if m._store_errors is not None:
            self._guarded(out, "store", lambda: [_single(_STORE_ERRORS, m._store_errors())])
        if m._job_counts is not None:
            self._guarded(out, "jobs", lambda: [self._jobs(m._job_counts())])
        return out

    @staticmethod
    def _engine(stats: EngineStats, waiting: Callable[[], int] | None) -> list[Metric]:
        families = [_single(f, stats) for f in _ENGINE_FAMILIES]
        families.append(_single(_WAITING, waiting() if waiting is not None else stats.num_waiting))
        return families

    @staticmethod
    def _jobs(counts: Mapping[str, int]) -> Metric:
        metric = _empty(_JOBS, ["status"])
        # every known status, zeros included, so a panel does not lose a line when it drains
        for status in dict.fromkeys([*JOB_STATUSES, *counts]):
            metric.add_metric([status], float(counts.get(status, 0)))
        return metric

    @staticmethod
    def _guarded(out: list[Metric], what: str, read: Callable[[], list[Metric]]) -> None:
        try:
            out.extend(read())
        except Exception:  # noqa: BLE001 - a scrape must succeed with what is readable
            log.exception("metrics: reading the %s snapshot failed", what)


class Metrics:
    """The metric families of one server (or worker) process, in their own registry, so
    two servers in one process (tests) never share counts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r, ns = self.registry, NAMESPACE
        self.http_requests = Counter("http_requests", "HTTP requests by route template, status code and tenant.",
                                     ["route", "status", "tenant"], namespace=ns, registry=r)
        self.http_duration = Histogram("http_request_duration_seconds",
                                       "HTTP request duration until the last byte of the response.",
                                       ["route"], namespace=ns, registry=r, buckets=LATENCY_BUCKETS)
        self.e2e_latency = Histogram("e2e_request_latency_seconds",
                                     "Generation latency from arrival at the engine to the last token.",
                                     namespace=ns, registry=r, buckets=LATENCY_BUCKETS)
        self.ttft = Histogram("time_to_first_token_seconds", "From arrival at the engine to the first token.",
                              namespace=ns, registry=r, buckets=LATENCY_BUCKETS)
        self.tpot = Histogram("time_per_output_token_seconds",
                              "Mean time between output tokens of a finished generation.",
                              namespace=ns, registry=r, buckets=LATENCY_BUCKETS)
        self.prompt_tokens = Counter("prompt_tokens", "Prompt tokens of finished generations (prefix excluded).",
                                     ["tenant"], namespace=ns, registry=r)
        self.generation_tokens = Counter("generation_tokens", "Tokens generated for finished generations.",
                                         ["tenant"], namespace=ns, registry=r)
        self.prefix_load = Histogram("prefix_load_seconds",
                                     "Loading a prefix not in host memory: store read, validation, cast.",
                                     namespace=ns, registry=r, buckets=LATENCY_BUCKETS)
        self.jobs_finished = Counter("training_jobs_finished", "Personalization jobs that ended, by final status.",
                                     ["status"], namespace=ns, registry=r)
        self.job_duration = Histogram("training_job_duration_seconds", "Run time of ended personalization jobs.",
                                      ["status"], namespace=ns, registry=r, buckets=JOB_DURATION_BUCKETS)
        self._engine_stats: Callable[[], EngineStats] | None = None
        self._engine_waiting: Callable[[], int] | None = None
        self._host_cache: HostCacheView | None = None
        self._store_errors: Callable[[], int] | None = None
        self._arena: ArenaView | None = None
        self._job_counts: Callable[[], Mapping[str, int]] | None = None
        self.registry.register(_SnapshotCollector(self))

    # ---- snapshot sources (read at scrape time) ---------------------------------------

    def watch_engine(self, stats: Callable[[], EngineStats], waiting: Callable[[], int] | None = None) -> None:
        """`stats`: AsyncEngine.stats; `waiting`: a count that also includes requests the loop
        has not picked up yet (AsyncEngine.num_waiting), else EngineStats.num_waiting."""
        self._engine_stats, self._engine_waiting = stats, waiting

    def watch_host_cache(self, cache: HostCacheView) -> None:
        self._host_cache = cache

    def watch_arena(self, arena: ArenaView) -> None:
        """The engine process's prefix arena (none with an in-process engine, or arena off)."""
        self._arena = arena

    def watch_store_errors(self, errors: Callable[[], int]) -> None:
        self._store_errors = errors

    def watch_jobs(self, counts: Callable[[], Mapping[str, int]]) -> None:
        """`counts()` -> {"queued": 3, "running": 1, ...} from the job queue."""
        self._job_counts = counts

    # ---- pushed observations ------------------------------------------------------------

    def observe_http(self, route: str, status: int, tenant: str, seconds: float) -> None:
        self.http_requests.labels(route, str(status), tenant).inc()
        self.http_duration.labels(route).observe(seconds)

    def observe_finished(self, tenant: str, out: RequestOutput, now: float | None = None) -> None:
        """A generation's last output: latencies from its monotonic timestamps, and tokens."""
        now = time.monotonic() if now is None else now
        if out.arrival_time > 0:
            self.e2e_latency.observe(max(now - out.arrival_time, 0.0))
            if out.first_token_time is not None:
                self.ttft.observe(max(out.first_token_time - out.arrival_time, 0.0))
        if out.first_token_time is not None and out.num_output_tokens > 1:
            self.tpot.observe(max(now - out.first_token_time, 0.0) / (out.num_output_tokens - 1))
        if out.index == 0:  # the n samples of a request share its prompt
            self.prompt_tokens.labels(tenant).inc(out.num_prompt_tokens)
        self.generation_tokens.labels(tenant).inc(out.num_output_tokens)

    def observe_prefix_load(self, seconds: float) -> None:
        self.prefix_load.observe(seconds)

    def record_job(self, status: str, duration_s: float) -> None:
        """A personalization job ended with `status` (a JobStatus or its value) after
        `duration_s` seconds of running. Called by the worker that ran it."""
        status = str(getattr(status, "value", status))  # str(JobStatus.FAILED) is not "failed"
        self.jobs_finished.labels(status).inc()
        self.job_duration.labels(status).observe(max(duration_s, 0.0))

    # ---- exposition ---------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text format."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def serve_http(self, port: int, addr: str = "0.0.0.0"):
        """Serve /metrics on its own port (a worker process, which has no HTTP app)."""
        from prometheus_client import start_http_server

        return start_http_server(port, addr, registry=self.registry)
