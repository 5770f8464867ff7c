"""/metrics of a live server after a fixed burst of traffic: the dashboard reads only what
is exported, the counts match what the server answered, the snapshot families mirror the
engine and the host cache, and no label grows with prefix ids or users."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.metrics import JOB_STATUSES, UNMATCHED_ROUTE
from tests.observability.conftest import TENANT, Traffic, send_traffic, wait_for_count
from tests.observability.promql import dashboard_exprs, metric_names, value

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "prefix-serve.json"
PROMETHEUS_MADE = {"up"}  # series Prometheus adds to every target itself
ALLOWED_LABELS = {"route", "status", "tenant", "le"}
P = "prefix_serve_"


@pytest.fixture(scope="module")
def traffic(stack, vocab) -> Traffic:
    return send_traffic(stack, vocab)


@pytest.fixture(scope="module")
def samples(stack, traffic) -> dict:
    # In production the worker records ended jobs and the job queue feeds the counts
    # (server.metrics.Metrics.record_job / watch_jobs); the burst has no jobs of its own.
    stack.ctx.metrics.record_job("succeeded", 42.0)
    stack.ctx.metrics.watch_jobs(lambda: {"queued": 2, "running": 1})
    # the last request of the burst: once it is counted, all are
    return wait_for_count(stack.url, P + "http_requests_total", 1, route="/v1/prefixes/{prefix_id}",
                          status="200", tenant=TENANT)


def test_dashboard_queries_name_only_exported_metrics(samples):
    dashboard = json.loads(DASHBOARD.read_text())
    used: dict[str, list[str]] = {}
    for where, expr in dashboard_exprs(dashboard):
        names = metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        for name in names:
            used.setdefault(name, []).append(where)
    assert len(used) > 30, sorted(used)
    missing = {n: w for n, w in used.items() if n not in samples and n not in PROMETHEUS_MADE}
    assert not missing, f"the dashboard reads metrics the server does not export: {missing}"


def test_requests_are_counted_by_route_status_and_tenant(samples, traffic: Traffic):
    reqs = P + "http_requests_total"
    assert value(samples, reqs, route="/v1/generate", status="200", tenant=TENANT) == traffic.generate_ok
    assert value(samples, reqs, route="/v1/generate", status="404", tenant=TENANT) == traffic.not_found
    assert value(samples, reqs, route="/v1/completions", status="200", tenant=TENANT) == traffic.completions_ok
    assert value(samples, reqs, route="/v1/prefixes/{prefix_id}", status="201", tenant=TENANT) == 1
    # tenant creation is the admin's request
    assert value(samples, reqs, route="/v1/admin/tenants", status="201", tenant="admin") == 1
    duration = P + "http_request_duration_seconds_count"
    assert value(samples, duration, route="/v1/generate") == traffic.generate_ok + traffic.not_found


def test_generation_latencies_and_tokens_match_the_answers(samples, traffic: Traffic):
    assert value(samples, P + "e2e_request_latency_seconds_count") == traffic.finished
    assert value(samples, P + "time_to_first_token_seconds_count") == traffic.finished
    assert value(samples, P + "time_per_output_token_seconds_count") == traffic.multi_token
    for name in ("e2e_request_latency_seconds", "time_to_first_token_seconds", "time_per_output_token_seconds"):
        assert value(samples, P + name + "_sum") > 0, name
        # every observation falls inside the +Inf bucket and the bucket counts are cumulative
        buckets = sorted((float(lab["le"]), v) for lab, v in samples[P + name + "_bucket"])
        assert [v for _, v in buckets] == sorted(v for _, v in buckets), name
    # e2e covers TTFT: the sum of latencies is at least the sum of first-token times
    assert value(samples, P + "e2e_request_latency_seconds_sum") >= value(samples, P + "time_to_first_token_seconds_sum")
    assert value(samples, P + "prompt_tokens_total", tenant=TENANT) == traffic.prompt_tokens
    assert value(samples, P + "generation_tokens_total", tenant=TENANT) == traffic.completion_tokens


def test_engine_families_mirror_the_engine_snapshot(stack, samples, traffic: Traffic):
    stats = stack.engine.stats()  # idle since the burst: the snapshot no longer moves
    assert value(samples, P + "kv_blocks_total") == stats.kv_blocks_total == stack.engine.engine.kv.pool.num_blocks
    assert value(samples, P + "kv_blocks_free") == stats.kv_blocks_free
    assert value(samples, P + "kv_blocks_used") == stats.kv_blocks_total - stats.kv_blocks_free
    assert value(samples, P + "kv_blocks_prefix") == stats.kv_blocks_used_by_prefixes > 0
    assert value(samples, P + "num_requests_running") == 0
    assert value(samples, P + "num_requests_waiting") == 0
    assert value(samples, P + "engine_steps_total") == stats.steps > 0
    assert value(samples, P + "engine_scheduled_tokens_total") == stats.scheduled_tokens > 0
    assert value(samples, P + "engine_scheduled_requests_total") == stats.scheduled_requests > 0
    assert value(samples, P + "engine_generation_tokens_total") == stats.generated_tokens >= traffic.completion_tokens
    assert value(samples, P + "engine_prompt_tokens_total") == stats.prompt_tokens > 0
    assert value(samples, P + "preemptions_total") == stats.preemptions
    assert value(samples, P + "device_prefixes") == stats.prefixes_resident >= 1
    assert value(samples, P + "device_prefix_bytes") == stats.prefixes_resident_bytes > 0
    assert value(samples, P + "device_prefix_cache_hits_total") == stats.prefix_hits >= 1
    assert value(samples, P + "device_prefix_cache_misses_total") == stats.prefix_misses >= 1
    assert value(samples, P + "device_prefix_cache_evictions_total") == stats.prefix_evictions


def test_host_residency_and_prefix_loads(stack, samples, traffic: Traffic):
    cache = stack.ctx.resolver.cache
    assert value(samples, P + "host_prefixes") == len(cache) == 1
    assert value(samples, P + "host_prefix_bytes") == cache.nbytes > 0
    assert value(samples, P + "host_prefix_cache_hits_total") == cache.hits >= 1
    assert value(samples, P + "host_prefix_cache_misses_total") == cache.misses >= 1
    # the one prefix was loaded from the store once; later requests found it in memory
    assert value(samples, P + "prefix_load_seconds_count") == 1
    assert value(samples, P + "prefix_load_seconds_sum") > 0
    assert value(samples, P + "store_errors_total") == 0


def test_training_job_families(samples):
    assert value(samples, P + "training_jobs_finished_total", status="succeeded") == 1
    assert value(samples, P + "training_job_duration_seconds_sum", status="succeeded") == 42.0
    jobs = {lab["status"]: v for lab, v in samples[P + "training_jobs"]}
    assert jobs == {s: {"queued": 2.0, "running": 1.0}.get(s, 0.0) for s in JOB_STATUSES}


def test_labels_never_grow_with_prefix_ids_or_users(stack, samples, traffic: Traffic):
    app = stack.server.server.config.app
    routes = set(app.openapi()["paths"]) | {UNMATCHED_ROUTE}
    for name, rows in samples.items():
        for labels, _ in rows:
            assert set(labels) <= ALLOWED_LABELS, f"{name} has labels {sorted(labels)}"
            assert not any(i in v for i in traffic.ids_used for v in labels.values()), f"{name} {labels}"
            if "route" in labels:
                assert labels["route"] in routes, f"{name}: route {labels['route']!r} is not a route template"
