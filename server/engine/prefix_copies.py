"""PrefixCopies: an engine process's host copies of prefix tensors, kept between requests.

A prefix's tensor crosses the pipe once (PrefixPayload with kv); later requests name it by
key only. Copies are kept LRU within a byte budget; a copy a running request uses is never
dropped. What is dropped is reported (StepBatch.forgotten), so the API sends it again.
Used by the seq2seq loop (server/engine/seq2seq_core.py).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace

from server.prefix import ModelSpec, Prefix


class PrefixCopies:
    def __init__(self, spec: ModelSpec, max_bytes: int) -> None:
        self.spec = spec
        self.max_bytes = max_bytes
        self._copies: OrderedDict[tuple, Prefix] = OrderedDict()  # LRU first
        self._users: dict[tuple, int] = {}  # key -> running requests that use it
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._copies)

    def get(self, payload, forgotten: list[tuple]) -> Prefix | None:
        """The copy for a PrefixPayload: kept from an earlier request, or made from its kv.
        None: this process forgot it (the API sends it again). Evictions go to `forgotten`."""
        prefix = self._copies.get(payload.key)
        if prefix is not None:
            self._copies.move_to_end(payload.key)
            return prefix
        if payload.kv is None:
            return None
        prefix = Prefix(kv=payload.kv, spec=self.spec, refs=payload.refs, encoder_kv=payload.encoder_kv,
                        cross_kv=payload.cross_kv)
        if not payload.refs:  # anonymous: keep its own key, which the API knows it by
            prefix = replace(prefix, serial=payload.key[1])
        self._copies[payload.key] = prefix
        self.nbytes += prefix.nbytes
        self._evict(forgotten, keep=payload.key)
        return prefix

    def use(self, key: tuple) -> None:
        self._users[key] = self._users.get(key, 0) + 1

    def release(self, key: tuple) -> None:
        left = self._users.get(key, 0) - 1
        if left > 0:
            self._users[key] = left
        else:
            self._users.pop(key, None)

    def forget(self, which: Callable[[tuple], bool], forgotten: list[tuple]) -> None:
        """Drop the copies `which` picks, unless in use (those go later, by LRU)."""
        for key in [k for k in self._copies if which(k) and k not in self._users]:
            self.nbytes -= self._copies.pop(key).nbytes
            forgotten.append(key)

    def _evict(self, forgotten: list[tuple], keep: tuple) -> None:
        for key in list(self._copies):
            if self.nbytes <= self.max_bytes:
                return
            if key != keep and key not in self._users:
                self.nbytes -= self._copies.pop(key).nbytes
                forgotten.append(key)
