"""The ASGI middleware that feeds HTTP traffic into server/metrics.py (route, status, tenant,
duration); the metrics module itself knows Prometheus, not HTTP."""

from __future__ import annotations

import time

from server.metrics import TENANT_STATE_KEY, UNMATCHED_ROUTE, Metrics


class MetricsMiddleware:
    """Pure ASGI (BaseHTTPMiddleware would break streaming): counts every HTTP request by
    route template, status and tenant, and times it to the last byte of the response.

    Added last, so it is the outermost user middleware and also sees 413s from the body
    limit. The route template is read from the scope after routing; the tenant from
    `request.state.tenant`, which authentication sets.
    """

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        state = scope.setdefault("state", {})  # the dict that request.state writes into
        status = 500  # an exception that escapes before any response is a 500

        async def send_and_note(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", None) or UNMATCHED_ROUTE
            tenant = str(state.get(TENANT_STATE_KEY, ""))
            self.metrics.observe_http(route, status, tenant, time.perf_counter() - start)
