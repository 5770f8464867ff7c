"""Draining: what `serve` does between SIGTERM and its exit.

    SIGTERM -> Drain.begin(): every request already inside the app runs to its end; every new
               one gets 503 with Retry-After and `Connection: close` (a load balancer or a
               client retries it elsewhere); /health still answers (the process is fine)
            -> no request inside (or drain_timeout_s passed) -> uvicorn stops -> the engine stops

A pure ASGI middleware (as body_limit.py) counts the requests inside the app, so a
streaming response counts until its last event is sent.
"""

from __future__ import annotations

import json
import time

from starlette.types import ASGIApp, Receive, Scope, Send

# Answered while draining: liveness (a draining process is not broken) and the metrics scrape.
_ALWAYS_ANSWERED = ("/health", "/metrics")


class Drain:
    """Whether the server drains, and how many requests are inside the app."""

    def __init__(self) -> None:
        self.draining = False
        self.since: float | None = None  # time.monotonic() when the drain began
        self.in_flight = 0  # requests inside the app (excluding the 503s of the drain)

    def begin(self) -> None:
        if not self.draining:
            self.draining, self.since = True, time.monotonic()


class DrainMiddleware:
    def __init__(self, app: ASGIApp, drain: Drain, retry_after_s: int = 1) -> None:
        self.app = app
        self.drain = drain
        self.retry_after_s = retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.drain.draining and scope.get("path") not in _ALWAYS_ANSWERED:
            await _send_503(send, self.retry_after_s)
            return
        self.drain.in_flight += 1  # one event loop: no lock needed
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1


async def _send_503(send: Send, retry_after_s: int) -> None:
    body = json.dumps({"error": {"type": "service_unavailable",
                                 "message": "the server is shutting down; retry on another replica or shortly"}}
                      ).encode()
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"retry-after", str(retry_after_s).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
