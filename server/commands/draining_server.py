"""uvicorn's Server, except that the first SIGTERM/SIGINT drains before uvicorn's own shutdown.

The listener stays open: new requests get 503 with Retry-After (server/api/drain.py) while
the running ones finish; then, or after drain_timeout_s, uvicorn shuts down as usual (and
the app's lifespan stops the engine). A second signal stops at once, as in plain uvicorn.
"""

from __future__ import annotations

import logging
import time

import uvicorn

from server.api.drain import Drain

log = logging.getLogger("prefix_serve")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain: Drain, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.drain_timeout_s = drain_timeout_s

    def handle_exit(self, sig, frame) -> None:
        if self.drain.draining or self.should_exit or not self.started:
            super().handle_exit(sig, frame)
            return
        # uvicorn re-raises captured signals once it has shut down: serve's own handler then
        # stops the workers and the owned redis-server.
        self._captured_signals.append(sig)
        self.drain.begin()
        log.info("draining: %d request(s) running; new requests get 503", self.drain.in_flight)

    async def on_tick(self, counter: int) -> bool:
        if self.drain.draining and not self.should_exit:
            waited = time.monotonic() - self.drain.since
            if self.drain.in_flight == 0 or waited >= self.drain_timeout_s:
                # uvicorn's own graceful shutdown gets what is left of the drain timeout
                self.config.timeout_graceful_shutdown = max(1, int(self.drain_timeout_s - waited))
                self.should_exit = True
        return await super().on_tick(counter)
