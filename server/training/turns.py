"""Who trains next: a worker's jobs take turns, one optimizer step at a time, and the turn
goes to the tenant that has had the least worker time.

NOTE: the invariants
- One job computes at a time (the holder of the turn); the others wait at a step boundary
  with their state in memory (no checkpoint, no requeue), so a long job yields after every
  step and loses nothing by it.
- Fairness is per tenant, not per job (virtual time, as VTC: Sheng et al. 2024): each
  tenant's counter is the worker time its jobs have held the turn. At every step boundary
  the waiting job of the tenant with the smallest counter goes next; a tenant's own jobs
  alternate. So while tenants have work waiting, each gets an equal share of the worker, a
  tenant's 1-step job waits at most one step of anyone else's, and a tenant alone gets all
  of it.
- A tenant that arrives is lifted to the smallest counter among the tenants already
  waiting or running, so time it was away is not saved up as credit; when no job is left,
  every counter is forgotten.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Entry:
    tenant: str
    since: int  # when it last started waiting (a sequence number): ties go to the longest wait
    waiting: bool = False


class TurnPolicy:
    """The choice alone, without threads: jobs join, wait, are charged, and leave."""

    def __init__(self) -> None:
        self.served: dict[str, float] = {}  # tenant -> worker time (seconds) its jobs held the turn
        self._jobs: dict[str, _Entry] = {}
        self._seq = itertools.count()

    def join(self, job_id: str, tenant: str) -> None:
        if job_id in self._jobs:
            raise ValueError(f"job {job_id} has already joined")
        active = {e.tenant for e in self._jobs.values()}
        if tenant not in active:
            floor = min((self.served[t] for t in active), default=0.0)
            self.served[tenant] = max(self.served.get(tenant, 0.0), floor)
        self._jobs[job_id] = _Entry(tenant, next(self._seq))

    def wait(self, job_id: str) -> None:
        """The job is at a step boundary (or has not started) and wants the turn."""
        entry = self._jobs[job_id]
        entry.waiting, entry.since = True, next(self._seq)

    def unwait(self, job_id: str) -> None:
        """The job gave up waiting (it is stopping)."""
        if job_id in self._jobs:
            self._jobs[job_id].waiting = False

    def charge(self, job_id: str, seconds: float) -> None:
        self.served[self._jobs[job_id].tenant] += max(0.0, seconds)

    def pick(self) -> str | None:
        """The waiting job to run next (it stops waiting), or None if none waits."""
        waiting = [(self.served[e.tenant], e.since, job_id) for job_id, e in self._jobs.items() if e.waiting]
        if not waiting:
            return None
        job_id = min(waiting)[2]
        self._jobs[job_id].waiting = False
        return job_id

    def waiting(self) -> list[str]:
        return [job_id for job_id, e in self._jobs.items() if e.waiting]

    def leave(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)
        if not self._jobs:
            self.served.clear()

    def __len__(self) -> int:
        return len(self._jobs)


class Turns:
    """TurnPolicy for the worker's job threads: `acquire` blocks until the job holds the turn;
    `yield_turn` charges the time held and lets the next one go; `leave` when done."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, poll_s: float = 0.25) -> None:
        self._policy = TurnPolicy()
        self._clock = clock
        self._poll_s = poll_s  # how often a waiting job checks whether it should stop instead
        self._cond = threading.Condition()
        self._holder: str | None = None
        self._held_since = 0.0
        self.granted: deque[str] = deque(maxlen=4096)  # job ids in the order they got the turn (tests)

    def join(self, job_id: str, tenant: str) -> None:
        with self._cond:
            self._policy.join(job_id, tenant)

    def acquire(self, job_id: str, should_stop: Callable[[], bool] = lambda: False) -> bool:
        """Wait for the turn; False (without it) once `should_stop()` says so."""
        with self._cond:
            self._policy.wait(job_id)
            return self._wait_for_turn(job_id, should_stop)

    def yield_turn(self, job_id: str, should_stop: Callable[[], bool] = lambda: False) -> bool:
        """At a step boundary: the turn goes to whoever is owed it (maybe this job again)."""
        with self._cond:
            self._release(job_id)
            self._policy.wait(job_id)
            return self._wait_for_turn(job_id, should_stop)

    def leave(self, job_id: str) -> None:
        with self._cond:
            if self._holder == job_id:
                self._release(job_id)
            self._policy.leave(job_id)
            self._grant()

    def served(self) -> dict[str, float]:
        with self._cond:
            return dict(self._policy.served)

    def waiting(self) -> list[str]:
        """Jobs waiting for the turn now."""
        with self._cond:
            return self._policy.waiting()

    def _wait_for_turn(self, job_id: str, should_stop: Callable[[], bool]) -> bool:
        self._grant()
        while self._holder != job_id:
            if should_stop():
                self._policy.unwait(job_id)
                return False
            self._cond.wait(self._poll_s)
        return True

    def _release(self, job_id: str) -> None:
        if self._holder != job_id:
            raise RuntimeError(f"job {job_id} does not hold the turn ({self._holder} does)")
        self._policy.charge(job_id, self._clock() - self._held_since)
        self._holder = None

    def _grant(self) -> None:
        if self._holder is not None:
            return
        job_id = self._policy.pick()
        if job_id is not None:
            self._holder, self._held_since = job_id, self._clock()
            self.granted.append(job_id)
            self._cond.notify_all()
