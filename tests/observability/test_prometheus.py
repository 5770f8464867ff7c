"""A real Prometheus scrapes a live server: its query API sees the request counts, the
latency quantiles the dashboard draws, and every dashboard query evaluates."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator

import pytest

from tests.observability.conftest import PROMPT, TENANT, Traffic, send_traffic
from tests.observability.prometheus_process import PrometheusServer
from tests.observability.promql import dashboard_exprs
from tests.observability.test_metrics_live import DASHBOARD

GENERATE_COUNT = f'sum(prefix_serve_http_requests_total{{route="/v1/generate", status="200", tenant="{TENANT}"}})'
TTFT_P90 = "histogram_quantile(0.9, sum by (le) (rate(prefix_serve_time_to_first_token_seconds_bucket[1m])))"
E2E_P50 = "histogram_quantile(0.5, sum by (le) (rate(prefix_serve_e2e_request_latency_seconds_bucket[1m])))"


@pytest.fixture(scope="module")
def prometheus(stack) -> Iterator[PrometheusServer]:
    prom = PrometheusServer([stack.url.removeprefix("http://")]).start()
    yield prom
    prom.stop()


@pytest.fixture(scope="module")
def observed(stack, vocab, prometheus) -> tuple[Traffic, dict[str, float]]:
    """The burst, then a trickle of requests until Prometheus has two scrapes with an
    increase between them (what rate() needs). Bounded: 60 s, one request per round."""
    traffic = send_traffic(stack, vocab)
    deadline = time.monotonic() + 60
    seen = {"count": math.nan, "ttft": math.nan, "e2e": math.nan}
    with stack.client(traffic.key) as c:
        while time.monotonic() < deadline:
            r = c.post("/v1/generate", json={"prefix_id": "support-bot", "prompt": PROMPT, "max_tokens": 3,
                                             "ignore_eos": True})
            assert r.status_code == 200, r.text
            seen = {k: prometheus.scalar(q) for k, q in (("count", GENERATE_COUNT), ("ttft", TTFT_P90),
                                                          ("e2e", E2E_P50))}
            if seen["count"] > traffic.generate_ok and all(math.isfinite(v) for v in seen.values()):
                break
            time.sleep(0.5)
    return traffic, seen


def test_prometheus_sees_requests_and_latency_quantiles(observed, prometheus):
    traffic, seen = observed
    assert seen["count"] > traffic.generate_ok, f"{seen}; prometheus log:\n{prometheus.log_tail()}"
    assert 0 < seen["ttft"] <= 120 and 0 < seen["e2e"] <= 120, seen
    up = prometheus.query('up{job="prefix-serve"}')
    assert [float(s["value"][1]) for s in up] == [1.0]
    tenants = {s["metric"]["tenant"] for s in prometheus.query("prefix_serve_generation_tokens_total")}
    assert tenants == {TENANT}


def test_every_dashboard_query_evaluates(observed, prometheus):
    dashboard = json.loads(DASHBOARD.read_text())
    empty = []
    for where, expr in dashboard_exprs(dashboard):
        concrete = expr.replace("$__rate_interval", "1m").replace("$instance", ".*").replace("$tenant", ".*")
        if not prometheus.query(concrete):  # a PromQL error fails inside query()
            empty.append(where)
    # Series that exist only once something happened (jobs, store errors, evictions) may
    # be empty here; the core panels must have data after the traffic.
    for needed in ("panel 'Requests/s by route and status'", "panel 'Time to first token'",
                   "panel 'End-to-end latency'", "panel 'KV pool blocks'", "panel 'Resident prefixes'",
                   "panel 'Requests/s by tenant'", "panel 'Engine step size'"):
        assert needed not in empty, f"{needed} has no data; empty panels: {empty}"
