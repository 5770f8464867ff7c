"""Fair turns between training jobs (server/training/turns.py): deterministic counts of the
steps each tenant gets, never time."""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter

import pytest

from server.training.turns import TurnPolicy, Turns


def simulate(policy: TurnPolicy, cost: dict[str, float], steps_left: dict[str, int], picks: int,
             arrivals: dict[int, tuple[str, str]] | None = None) -> list[str]:
    """Run `picks` turns: the job picked does one step of cost[job], then waits again (or
    leaves when its steps are done). arrivals: {pick index: (job, tenant)} joining then."""
    order = []
    for i in range(picks):
        if arrivals and i in arrivals:
            job, tenant = arrivals[i]
            policy.join(job, tenant)
            policy.wait(job)
        job = policy.pick()
        if job is None:
            break
        order.append(job)
        policy.charge(job, cost[job])
        steps_left[job] -= 1
        if steps_left[job] == 0:
            policy.leave(job)
        else:
            policy.wait(job)
    return order


def start(jobs: dict[str, str]) -> TurnPolicy:
    policy = TurnPolicy()
    for job, tenant in jobs.items():
        policy.join(job, tenant)
        policy.wait(job)
    return policy


def test_two_backlogged_tenants_alternate():
    policy = start({"a1": "acme", "b1": "globex"})
    order = simulate(policy, {"a1": 1, "b1": 1}, {"a1": 10**6, "b1": 10**6}, 100)
    assert order[:4] == ["a1", "b1", "a1", "b1"]
    assert Counter(order) == {"a1": 50, "b1": 50}


def test_fairness_is_per_tenant_not_per_job():
    policy = start({"a1": "acme", "a2": "acme", "b1": "globex"})
    order = simulate(policy, {"a1": 1, "a2": 1, "b1": 1}, {"a1": 10**6, "a2": 10**6, "b1": 10**6}, 100)
    counts = Counter(order)
    assert counts["b1"] == 50 and counts["a1"] == counts["a2"] == 25  # acme's two jobs share acme's half


def test_shares_are_of_worker_time_so_cheap_steps_come_more_often():
    # acme's steps cost 4 (long examples, a long prefix), globex's 1: globex gets 4 steps per acme step
    policy = start({"a1": "acme", "b1": "globex"})
    order = simulate(policy, {"a1": 4, "b1": 1}, {"a1": 10**6, "b1": 10**6}, 100)
    counts = Counter(order)
    assert counts == {"a1": 20, "b1": 80}
    assert abs(policy.served["acme"] - policy.served["globex"]) <= 4  # within one step of each other


def test_the_issue_case_a_one_step_job_waits_for_one_step_of_the_long_job():
    """acme: 1,000 examples, 2,000 steps of ~20 s; globex arrives with a 1-step job after
    acme ran 500 steps alone. globex runs after at most one more acme step, and acme's
    500 steps alone are no credit against it."""
    policy = start({"long": "acme"})
    order = simulate(policy, {"long": 20, "short": 20}, {"long": 2000, "short": 1}, 600,
                     arrivals={500: ("short", "globex")})
    assert order[:500] == ["long"] * 500
    assert order.index("short") <= 501
    assert order[order.index("short") + 1:] == ["long"] * (len(order) - order.index("short") - 1)


def test_an_arriving_tenant_is_lifted_and_saves_no_credit():
    policy = start({"a1": "acme"})
    order = simulate(policy, {"a1": 1, "b1": 1}, {"a1": 10**6, "b1": 10**6}, 300, arrivals={200: ("b1", "globex")})
    after = order[200:]
    # without the lift, globex would run 200 steps in a row to catch up
    assert max(len(list(g)) for k, g in itertools.groupby(after) if k == "b1") == 1
    assert Counter(after) == {"a1": 50, "b1": 50}


def test_counters_are_forgotten_when_no_job_is_left():
    policy = start({"a1": "acme"})
    simulate(policy, {"a1": 5}, {"a1": 3}, 10)
    assert len(policy) == 0 and policy.served == {}
    policy.join("b1", "globex")
    assert policy.served == {"globex": 0.0}


def test_a_job_cannot_join_twice():
    policy = start({"a1": "acme"})
    with pytest.raises(ValueError, match="already joined"):
        policy.join("a1", "acme")


def test_turns_hand_over_between_threads_at_each_yield():
    """Two job threads on Turns with a clock where each turn costs 1: once b waits, they
    alternate at every yield; a waiting job told to stop gives up without the turn."""
    turns = Turns(clock=itertools.count().__next__, poll_s=0.01)
    trace: list[str] = []
    b_waits = threading.Event()

    def run(job_id: str, tenant: str, steps: int) -> None:
        turns.join(job_id, tenant)
        assert turns.acquire(job_id)
        for step in range(steps):
            trace.append(job_id)
            if job_id == "a" and step == 0:
                assert b_waits.wait(10)  # b asks for the turn while a holds it
            if step < steps - 1:
                assert turns.yield_turn(job_id)
        turns.leave(job_id)

    a = threading.Thread(target=run, args=("a", "acme", 6))
    a.start()
    assert wait_for(lambda: trace == ["a"])
    b = threading.Thread(target=run, args=("b", "globex", 3))
    b.start()
    assert wait_for(lambda: turns.waiting() == ["b"])
    b_waits.set()
    a.join(10), b.join(10)
    assert not a.is_alive() and not b.is_alive()
    assert trace == ["a", "b", "a", "b", "a", "b", "a", "a", "a"]

    turns.join("x", "acme")
    assert turns.acquire("x")
    turns.join("y", "globex")
    assert turns.acquire("y", should_stop=lambda: True) is False  # gives up: x keeps the turn
    assert turns.waiting() == []
    turns.leave("y")
    assert turns.yield_turn("x")  # alone again: the turn comes straight back
    turns.leave("x")


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True
