"""server.metrics on its own (pure logic, no server): latency arithmetic from a finished
output's timestamps, snapshot families, job counts, a failing source, and the PromQL name
extraction the dashboard test relies on."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from server.engine.outputs import EngineStats, RequestOutput
from server.metrics import JOB_STATUSES, Metrics
from tests.observability.promql import metric_names


def samples(m: Metrics) -> dict[str, list[tuple[dict, float]]]:
    body, content_type = m.render()
    assert content_type.startswith("text/plain")
    out: dict[str, list[tuple[dict, float]]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def one(s: dict, name: str) -> float:
    (row,) = s[name]
    return row[1]


def test_finished_output_gives_ttft_tpot_e2e_and_tokens():
    m = Metrics()
    out = RequestOutput("r1", [], "", True, num_prompt_tokens=7, num_output_tokens=5,
                        first_token_time=10.5, arrival_time=10.0)
    m.observe_finished("acme", out, now=12.5)
    s = samples(m)
    assert one(s, "prefix_serve_time_to_first_token_seconds_sum") == 0.5
    assert one(s, "prefix_serve_e2e_request_latency_seconds_sum") == 2.5
    assert one(s, "prefix_serve_time_per_output_token_seconds_sum") == 0.5  # 2 s over 4 gaps
    assert s["prefix_serve_prompt_tokens_total"] == [({"tenant": "acme"}, 7.0)]
    assert s["prefix_serve_generation_tokens_total"] == [({"tenant": "acme"}, 5.0)]


def test_single_token_output_has_no_tpot():
    m = Metrics()
    m.observe_finished("acme", RequestOutput("r", [], "", True, num_output_tokens=1, first_token_time=1.0,
                                             arrival_time=0.5), now=1.0)
    s = samples(m)
    assert one(s, "prefix_serve_time_per_output_token_seconds_count") == 0
    assert one(s, "prefix_serve_time_to_first_token_seconds_count") == 1


def test_engine_snapshot_is_read_at_every_scrape():
    m = Metrics()
    stats = EngineStats(num_running=3, num_waiting=1, kv_blocks_total=100, kv_blocks_free=60,
                        kv_blocks_used_by_prefixes=8, steps=10, scheduled_tokens=250, preemptions=2)
    m.watch_engine(lambda: stats, waiting=lambda: 4)
    s = samples(m)
    assert one(s, "prefix_serve_num_requests_running") == 3
    assert one(s, "prefix_serve_num_requests_waiting") == 4  # the waiting callable wins
    assert one(s, "prefix_serve_kv_blocks_used") == 40
    assert one(s, "prefix_serve_kv_blocks_prefix") == 8
    assert one(s, "prefix_serve_engine_scheduled_tokens_total") == 250
    assert one(s, "prefix_serve_preemptions_total") == 2
    stats = EngineStats(num_running=0, kv_blocks_total=100, kv_blocks_free=100, steps=11)
    s = samples(m)
    assert one(s, "prefix_serve_num_requests_running") == 0
    assert one(s, "prefix_serve_engine_steps_total") == 11


def test_a_failing_source_leaves_the_others_on_the_page():
    class Cache:
        nbytes, hits, misses, evictions = 4096, 5, 2, 1

        def __len__(self) -> int:
            return 3

    def broken() -> EngineStats:
        raise RuntimeError("engine gone")

    m = Metrics()
    m.watch_engine(broken)
    m.watch_host_cache(Cache())
    m.watch_store_errors(lambda: 9)
    s = samples(m)
    assert "prefix_serve_kv_blocks_total" not in s
    assert one(s, "prefix_serve_host_prefixes") == 3
    assert one(s, "prefix_serve_host_prefix_bytes") == 4096
    assert one(s, "prefix_serve_host_prefix_cache_evictions_total") == 1
    assert one(s, "prefix_serve_store_errors_total") == 9


def test_prefix_arena_families_read_the_arena_at_every_scrape():
    import torch

    from server.engine.prefix_arena import ALIGN, PrefixArena

    arena = PrefixArena.create(4 * ALIGN)
    try:
        m = Metrics()
        m.watch_arena(arena)
        s = samples(m)
        assert one(s, "prefix_serve_prefix_arena_bytes") == 4 * ALIGN
        assert one(s, "prefix_serve_prefix_arena_slots") == one(s, "prefix_serve_prefix_arena_used_bytes") == 0
        held = arena.put(torch.zeros(ALIGN // 4))  # one aligned slot
        assert arena.put(torch.zeros(4 * ALIGN)) is None  # no room: the pipe takes it
        s = samples(m)
        assert one(s, "prefix_serve_prefix_arena_slots") == 1
        assert one(s, "prefix_serve_prefix_arena_used_bytes") == ALIGN
        assert one(s, "prefix_serve_prefix_arena_puts_total") == 1
        assert one(s, "prefix_serve_prefix_arena_fallbacks_total") == 1
        arena.free(held.id)
        assert one(samples(m), "prefix_serve_prefix_arena_used_bytes") == 0
    finally:
        arena.close()
        arena.unlink()


def test_jobs_by_status_include_zeros_and_durations_by_status():
    m = Metrics()
    m.watch_jobs(lambda: {"running": 2, "failed": 1})
    m.record_job("failed", 30.0)
    m.record_job("succeeded", 600.0)
    s = samples(m)
    assert {lab["status"]: v for lab, v in s["prefix_serve_training_jobs"]} == \
        {st: {"running": 2.0, "failed": 1.0}.get(st, 0.0) for st in JOB_STATUSES}
    assert {lab["status"]: v for lab, v in s["prefix_serve_training_job_duration_seconds_sum"]} == \
        {"failed": 30.0, "succeeded": 600.0}


def test_two_metrics_objects_never_share_counts():
    a, b = Metrics(), Metrics()
    a.observe_http("/v1/generate", 200, "acme", 0.1)
    assert "prefix_serve_http_requests_total" not in samples(b)


def test_promql_metric_names():
    assert metric_names('histogram_quantile(0.9, sum by (le, route) (rate(x_bucket{instance=~"$instance"}'
                        '[$__rate_interval])))') == {"x_bucket"}
    assert metric_names("sum(rate(a_total[5m])) / sum(rate(b_total[5m])) > bool 0") == {"a_total", "b_total"}
    assert metric_names('max by (status) (jobs) or on(instance) up{job="x"} offset 1h') == {"jobs", "up"}
    assert metric_names('sum without (tenant) (c{route="/v1/generate"}) * 1e3') == {"c"}
