"""The engine process's host copies of prefixes, by Prefix.key, within a byte budget: a
prefix's tensor crosses the command channel once (PrefixPayload with kv), and later
commands name it by key alone (kv None) until this LRU reports the key as forgotten.

# NOTE: the invariant the API side relies on (server/engine/async_engine.py `_core_has`):
# every key this LRU stops holding is reported once through `take_forgotten()`, and a
# payload without kv for a key it does not hold gets None (the core then asks for the
# tensor again: StepBatch.need_prefix). Eviction never drops the entry just added, nor a
# key the caller pins (a running request's prefix), so the budget can be exceeded by those.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import replace
from typing import TYPE_CHECKING

from server.prefix import ModelSpec, Prefix

if TYPE_CHECKING:  # engine_core imports this module
    from server.engine.engine_core import PrefixPayload


class PrefixLRU:
    def __init__(self, spec: ModelSpec, max_bytes: int) -> None:
        self.spec = spec  # the engine's model: every prefix here was checked against it by the API
        self.max_bytes = max_bytes
        self._prefixes: OrderedDict[tuple, Prefix] = OrderedDict()  # least recently used first
        self._forgotten: list[tuple] = []  # keys dropped since the last take_forgotten()
        self.nbytes = 0  # bytes held

    def __len__(self) -> int:
        return len(self._prefixes)

    def __contains__(self, key: tuple) -> bool:
        return key in self._prefixes

    def get(self, payload: PrefixPayload, pinned: Collection[tuple] = ()) -> Prefix | None:
        """The host copy of `payload`'s prefix: kept from an earlier command, or made from the
        payload's tensor (then least recently used unpinned ones are dropped to fit the
        budget). None: not held here and the payload has no tensor, so ask for it again."""
        prefix = self._prefixes.get(payload.key)
        if prefix is not None:
            self._prefixes.move_to_end(payload.key)
            return prefix
        if payload.kv is None:
            return None
        prefix = Prefix(kv=payload.kv, spec=self.spec, refs=payload.refs, head=payload.head,
                        encoder_kv=payload.encoder_kv, cross_kv=payload.cross_kv)
        if not payload.refs:  # anonymous: keep its own key, which the API knows it by
            prefix = replace(prefix, serial=payload.key[1])
        self._prefixes[payload.key] = prefix
        self.nbytes += prefix.nbytes
        self._evict(keep={payload.key, *pinned})
        return prefix

    def forget_stale(self, tenant: str, prefix_id: str, keep_version: str | None,
                     pinned: Collection[tuple] = ()) -> None:
        """Drop every unpinned prefix with a part (tenant, prefix_id) at a version other than
        `keep_version` (None: every version)."""
        self._forget(lambda key: key not in pinned and any(
            getattr(r, "tenant", None) == tenant and getattr(r, "prefix_id", None) == prefix_id
            and r.version != keep_version for r in key))

    def take_forgotten(self) -> list[tuple]:
        """The keys dropped since the last call (each reported once)."""
        out, self._forgotten = self._forgotten, []
        return out

    def _evict(self, keep: set[tuple]) -> None:
        for key in list(self._prefixes):
            if self.nbytes <= self.max_bytes:
                return
            if key not in keep:
                self._drop(key)

    def _forget(self, which: Callable[[tuple], bool]) -> None:
        for key in [k for k in self._prefixes if which(k)]:
            self._drop(key)

    def _drop(self, key: tuple) -> None:
        self.nbytes -= self._prefixes.pop(key).nbytes
        self._forgotten.append(key)
