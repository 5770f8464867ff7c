"""The host-memory tier of prefix residency, and resolving a request's prefix ids.

    device (prefix blocks in the KV pool, the engine's PrefixCache)
      <- host memory (this LRU: validated Prefix objects in the engine dtype)
        <- Redis (prefix_store)

# NOTE: invariants
# - Entries are keyed by the refs (tenant, id, version) of every part, so a re-upload under
#   the same id is a different key: the old tensor can never be served for the new version.
# - Every resolve asks the store for the current version of each id (one HGET); the LRU
#   only saves the tensor transfer and the validation. When the store cannot be reached,
#   the version last seen for that id is served if it is still resident (requests on warm
#   prefixes keep working while Redis is down); a cold prefix is then PrefixUnavailable.
# - Store events drop entries of other versions at once (memory, and the fallback above
#   must not pick a stale copy). Requests already running hold their own Prefix object
#   and finish on it.
# - Loading happens in the request's coroutine (Redis and validation in worker threads),
#   before the request reaches the engine: the step loop never waits for a load.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import torch

from prefix_store import PrefixEvent, PrefixRecord, PrefixStore, StoreUnavailableError
from prefix_store.errors import shorten
from server.engine.prefix import Prefix, PrefixRef, compose

SHARED_PREFIX = "shared/"  # "shared/<id>": a prefix the admin tenant marked shared, read-only
USER_PREFIX = "user:"  # "user:<user_id>" is a user's personalized prefix


def is_shareable(record: PrefixRecord) -> bool:
    """Reachable as `shared/<id>`: marked shared by the admin, and not a user prefix."""
    return record.shared and not record.prefix_id.startswith(USER_PREFIX)


class PrefixNotFound(LookupError):
    """No such prefix for this tenant (also when another tenant has one: never reveal that)."""


class PrefixUnavailable(RuntimeError):
    """The store is unreachable and the prefix is not resident in host memory."""


class PrefixMismatch(ValueError):
    """The stored prefix was made for another base model than the one loaded."""


class HostPrefixCache:
    """LRU of Prefix objects within a byte budget; thread-safe (store events arrive on a thread)."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[tuple[PrefixRef, ...], Prefix] = OrderedDict()  # LRU first
        # (tenant, id) -> (version last seen in the store, whether it was marked shared)
        self._latest: dict[tuple[str, str], tuple[str, bool]] = {}
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[PrefixRef, ...]) -> Prefix | None:
        with self._lock:
            prefix = self._entries.get(key)
            if prefix is None:
                self.misses += 1
                return None
            self.hits += 1
            self._entries.move_to_end(key)
            return prefix

    def put(self, prefix: Prefix) -> None:
        """Keep `prefix` (a prefix larger than the whole budget is simply not kept)."""
        key = prefix.key
        with self._lock:
            if key in self._entries or prefix.nbytes > self.capacity_bytes:
                return
            self._entries[key] = prefix
            self.nbytes += prefix.nbytes
            while self.nbytes > self.capacity_bytes:
                _, old = self._entries.popitem(last=False)
                self.nbytes -= old.nbytes
                self.evictions += 1

    def note_version(self, ref: PrefixRef, shared: bool = False) -> None:
        with self._lock:
            self._latest[(ref.tenant, ref.prefix_id)] = (ref.version, shared)

    def latest_resident(self, tenant: str, prefix_id: str, shared_only: bool = False) -> Prefix | None:
        """The resident copy of the version last seen in the store, for when the store is
        down (with `shared_only`, only if that version was marked shared)."""
        with self._lock:
            latest = self._latest.get((tenant, prefix_id))
            if latest is None or (shared_only and not latest[1]):
                return None
            return self._entries.get((PrefixRef(tenant, prefix_id, latest[0]),))

    def drop_stale(self, tenant: str, prefix_id: str, keep_version: str | None) -> int:
        """Drop every entry that uses (tenant, id) in a version other than keep_version."""
        with self._lock:
            if keep_version is None or self._latest.get((tenant, prefix_id), ("",))[0] != keep_version:
                # a new version: whether it is shared is learnt at its next resolve
                self._latest.pop((tenant, prefix_id), None)
            stale = [k for k in self._entries
                     if any(r.tenant == tenant and r.prefix_id == prefix_id and r.version != keep_version
                            for r in k)]
            for key in stale:
                self.nbytes -= self._entries.pop(key).nbytes
            return len(stale)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._latest.clear()
            self.nbytes = 0


class PrefixResolver:
    """Turns a tenant's prefix ids into one composed Prefix, loading what is not resident."""

    def __init__(self, store: PrefixStore, make_prefix: Callable[[torch.Tensor, tuple[PrefixRef, ...]], Prefix],
                 cache: HostPrefixCache, model_fingerprint: str, *, admin_tenant: str = "admin",
                 shared_prefixes: bool = True,
                 on_stale: Callable[[str, str, str | None], None] | None = None) -> None:
        self.store = store
        self.make_prefix = make_prefix  # engine.make_prefix: validates and casts to the engine dtype
        self.cache = cache
        self.model_fingerprint = model_fingerprint
        self.admin_tenant = admin_tenant
        self.shared_prefixes = shared_prefixes
        self._loading: dict[PrefixRef, asyncio.Task] = {}
        self.on_stale = on_stale  # drops device copies too (AsyncEngine.drop_stale_prefix)
        self.on_load: Callable[[float], None] | None = None  # metrics: seconds of each load from the store

    def owner_of(self, tenant: str, name: str) -> tuple[str, str]:
        """(owning tenant, prefix id) for a name as a client writes it."""
        if name.startswith(SHARED_PREFIX):
            if not self.shared_prefixes:
                raise PrefixNotFound(f"prefix {shorten(name)} not found: shared prefixes are turned off on this server")
            return self.admin_tenant, name[len(SHARED_PREFIX):]
        return tenant, name

    def record_of(self, tenant: str, name: str) -> PrefixRecord:
        """The current record of a name as `tenant` may see it. A `shared/` name reaches only
        what the admin marked shared, and never a user prefix. Raises PrefixNotFound,
        InvalidIdError, StoreUnavailableError (blocking: call it in a thread)."""
        owner, prefix_id = self.owner_of(tenant, name)
        record = self.store.get_record(owner, prefix_id)
        if record is None or (name.startswith(SHARED_PREFIX) and not is_shareable(record)):
            if record is None:
                self.cache.drop_stale(owner, prefix_id, None)
            raise PrefixNotFound(f"prefix {shorten(name)} not found")
        return record

    async def resolve(self, tenant: str, names: list[str]) -> Prefix | None:
        """The composed prefix for `names` (in order); None for an empty list."""
        if not names:
            return None
        parts = [await self._resolve_one(tenant, name) for name in names]
        if len(parts) == 1:
            return parts[0]
        key = tuple(r for p in parts for r in p.refs)
        composed = self.cache.get(key)
        if composed is None:
            composed = await asyncio.to_thread(compose, parts)
            self.cache.put(composed)
        return composed

    async def _resolve_one(self, tenant: str, name: str) -> Prefix:
        owner, prefix_id = self.owner_of(tenant, name)
        try:  # InvalidIdError (a malformed id) goes to the caller as it is
            record = await asyncio.to_thread(self.record_of, tenant, name)
        except StoreUnavailableError as e:
            resident = self.cache.latest_resident(owner, prefix_id, shared_only=name.startswith(SHARED_PREFIX))
            if resident is not None:
                return resident
            raise PrefixUnavailable(f"prefix {shorten(name)} is not loaded on this server and the prefix store "
                                    "is unreachable; retry shortly") from e
        if record.model_fingerprint != self.model_fingerprint:
            raise PrefixMismatch(f"prefix {shorten(name)} was made for base model fingerprint "
                                 f"{record.model_fingerprint}; this server runs {self.model_fingerprint}")
        self.cache.note_version(record.ref, is_shareable(record))
        prefix = self.cache.get((record.ref,))
        if prefix is not None:
            return prefix
        return await self._load(record, name)

    async def _load(self, record: PrefixRecord, name: str) -> Prefix:
        # One load per version at a time, in its own task: concurrent requests for a cold
        # prefix share it, and a requester that goes away does not cancel it for the others.
        ref = record.ref
        task = self._loading.get(ref)
        if task is None:
            task = asyncio.ensure_future(self._fetch(ref, name))
            self._loading[ref] = task
            task.add_done_callback(lambda t: self._loading.pop(ref, None) and (t.cancelled() or t.exception()))
        return await asyncio.shield(task)

    async def _fetch(self, ref: PrefixRef, name: str) -> Prefix:
        start = time.perf_counter()
        try:
            kv = await asyncio.to_thread(self.store.get_version, ref.tenant, ref.prefix_id, ref.version)
        except StoreUnavailableError as e:
            raise PrefixUnavailable(f"prefix {shorten(name)} could not be loaded: the prefix store is "
                                    "unreachable; retry shortly") from e
        if kv is None:  # replaced or deleted between the two reads, and its grace period is over
            raise PrefixNotFound(f"prefix {shorten(name)} not found (it was just replaced or deleted; retry)")
        prefix = await asyncio.to_thread(self.make_prefix, kv, (ref,))
        self.cache.put(prefix)
        if self.on_load is not None:
            self.on_load(time.perf_counter() - start)
        return prefix

    # --- store events (called on the subscription's thread)

    def on_event(self, event: PrefixEvent) -> None:
        keep = event.version if event.kind == "put" else None
        self.cache.drop_stale(event.tenant, event.prefix_id, keep)
        if self.on_stale is not None:
            self.on_stale(event.tenant, event.prefix_id, keep)

    def on_reconnect(self) -> None:
        # Events published while we were disconnected are lost. Every resolve re-checks the
        # version with the store anyway, so only the fallback map can be stale: forget it.
        self.cache.clear()
