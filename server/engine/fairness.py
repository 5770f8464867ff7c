"""Fair service across tenants: the virtual token counter (VTC) and the split of a step's
budget between tenants.

Reference: Sheng et al. 2024, "Fairness in Serving Large Language Models" (OSDI; VTC, as
in S-LoRA). Every tenant has a counter of the service it received (here: tokens computed
for it, prefill and decode alike, each token one row of a forward pass). The scheduler
serves the backlogged tenant with the smallest counter first, so over any interval the
tokens of two backlogged tenants differ by a bounded amount, whatever their request shapes.

# NOTE: invariants
# - A tenant that becomes backlogged (its first request arrives while it has none queued
#   or running) has its counter lifted to the smallest counter of the tenants already
#   backlogged: idle time is not banked as credit. When no tenant is backlogged, history
#   is forgotten (every counter starts again from zero).
# - Counters of idle tenants that a lift would overwrite anyway are dropped, so the table
#   holds at most the backlogged tenants plus those that are ahead of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


class VirtualTokenCounter:
    def __init__(self) -> None:
        self._served: dict[str, float] = {}  # tenant -> virtual tokens (lifted on joining)

    def __getitem__(self, tenant: str) -> float:
        return self._served.get(tenant, 0.0)

    def join(self, tenant: str, backlogged: Iterable[str]) -> None:
        """`tenant` has work again; `backlogged` are the tenants that had work already."""
        floor = min((self._served.get(t, 0.0) for t in backlogged), default=None)
        if floor is None:  # nobody is waiting for service: start from a clean slate
            self._served.clear()
            self._served[tenant] = 0.0
            return
        self._served[tenant] = max(self._served.get(tenant, 0.0), floor)
        active = set(backlogged) | {tenant}
        for t in [t for t, v in self._served.items() if t not in active and v <= floor]:
            del self._served[t]  # would be lifted to at least `floor` on joining anyway

    def charge(self, tenant: str, tokens: int) -> None:
        self._served[tenant] = self._served.get(tenant, 0.0) + tokens


def fair_shares(demands: Mapping[str, int], budget: int,
                levels: Mapping[str, float] | None = None) -> dict[str, int]:
    """Split `budget` between tenants by water-filling: tokens go to the tenants whose level
    (their VTC counter) is lowest, raising them together, each up to its demand. With equal
    levels this is the max-min fair split: every tenant gets min(its demand, an equal
    share), and what one does not need is shared by the others. Integer shares; a remainder
    goes to the lowest levels (then to the tenants listed first).

        fair_shares({"a": 1000, "b": 10}, 100) == {"a": 90, "b": 10}
        fair_shares({"a": 1000, "b": 1000}, 100, levels={"a": 0, "b": 60}) == {"a": 80, "b": 20}
    """
    level = {t: (levels or {}).get(t, 0.0) for t in demands}
    shares = dict.fromkeys(demands, 0)
    open_ = [t for t, d in demands.items() if d > 0]
    if budget <= 0 or not open_:
        return shares
    if sum(demands[t] for t in open_) <= budget:
        return {t: max(0, d) for t, d in demands.items()}
    if len(open_) == 1:  # the common case: one tenant with work
        shares[open_[0]] = budget
        return shares

    def filled(water: float) -> float:  # tokens needed to raise every open tenant to `water`
        return sum(min(demands[t], max(0.0, water - level[t])) for t in open_)

    low, high = min(level[t] for t in open_), max(level[t] for t in open_) + budget
    for _ in range(64):  # bisection on the water level; filled() is monotone
        mid = (low + high) / 2
        low, high = (mid, high) if filled(mid) < budget else (low, mid)
    for t in open_:
        shares[t] = min(demands[t], int(max(0.0, low - level[t])))
    left = budget - sum(shares.values())
    for t in sorted(open_, key=lambda t: level[t]):  # the remainder, one token each, lowest first
        if left <= 0:
            break
        if shares[t] < demands[t]:
            shares[t] += 1
            left -= 1
    return shares
