"""Background traffic for the fault tests: client threads sending requests in a bounded loop
(a count and a time) while a test breaks something, recording every answer."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx


@dataclass
class Answer:
    name: str  # which request of the traffic
    status: int  # 0: no HTTP answer (transport error)
    body: dict = field(default_factory=dict)
    error: str = ""


class Traffic:
    """`threads` clients, each sending `requests` (name -> (method, path, json)) in turn until
    stop(), at most `limit` requests and `seconds` each."""

    def __init__(self, url: str, key: str, requests: dict[str, tuple[str, str, dict | None]], threads: int = 2,
                 limit: int = 5000, seconds: float = 180.0) -> None:
        self.url, self.key, self.requests = url, key, requests
        self.limit, self.seconds = limit, seconds
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> "Traffic":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)

    def wait_answers(self, count: int, timeout: float = 60.0) -> None:
        """Until `count` more answers arrived (the traffic is really flowing)."""
        target, deadline = len(self.answers) + count, time.monotonic() + timeout
        while len(self.answers) < target and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.answers) >= target, f"the traffic stalled: {self.statuses()}"

    def statuses(self, name: str | None = None) -> Counter:
        return Counter(a.status for a in self.answers if name is None or a.name == name)

    def _run(self, index: int) -> None:
        names = list(self.requests)
        deadline = time.monotonic() + self.seconds
        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=60) as c:
            for n in range(self.limit):
                if self._stop.is_set() or time.monotonic() > deadline:
                    return
                name = names[(n + index) % len(names)]
                method, path, body = self.requests[name]
                try:
                    r = c.request(method, path, json=body)
                    try:
                        data = r.json()
                    except ValueError:
                        data = {"raw": r.text[:200]}
                    self.answers.append(Answer(name, r.status_code, data))
                except httpx.HTTPError as e:
                    self.answers.append(Answer(name, 0, error=f"{type(e).__name__}: {e}"))
