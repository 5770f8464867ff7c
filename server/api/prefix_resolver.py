"""Resolving a request's prefix ids into one composed Prefix, loading what is not resident.

# NOTE: invariants
# - Every resolve asks the store for the current version of each id (one HGET); the host
#   LRU (host_prefixes.py) only saves the tensor transfer and the check. When the store
#   cannot be reached, the version last seen for that id is served if it is still resident
#   (requests on warm prefixes keep working while Redis is down); a cold prefix is then
#   PrefixUnavailable.
# - A `shared/<id>` name reaches only a prefix the admin tenant marked shared, never a
#   user prefix, also through the outage fallback.
# - Store events drop copies of other versions at once, on the host and on the device
#   (memory, and the fallback above must not pick a stale copy). Requests already running
#   hold their own Prefix object and finish on it.
# - Loading happens when the request arrives, before it reaches the engine's queue (Redis
#   and the check in worker threads): a queued request's prefix is on the host before its
#   turn, and the step loop never waits for Redis.
# - At most `max_concurrent_loads` loads run at once, on threads of their own: a storm of
#   cold prefixes queues there, while requests on resident prefixes (one HGET each, on the
#   default executor) go on.
# - A prefix whose record says what it was trained after (a user prefix: its task prefix
#   and version, or none) is served only right after exactly those prefixes, unless the
#   request allows it: served after anything else, it meets keys and values it never saw
#   (the README's user prefix trained alone, then served after a task prefix, answered
#   with an empty reply). Served from the outage fallback (no record) it is not checked.
# - A load reads the version's copy in the engine's dtype when its record names one (half
#   the bytes of float32 for bf16, no cast), else the tensor as stored, cast (and the store
#   then writes the copy). Either is checked against a hash from the record, once per
#   process (the store's VerifiedVersions, forgotten on reconnect). A seq2seq prefix whose
#   record counts encoder or cross tokens (the three-prefix form) is read as stored, with
#   its parts (get_version with_parts), and made with them; several such prefixes compose
#   part by part (Prefix.compose concatenates each part on its own).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import torch

from prefix_store import PrefixEvent, PrefixRecord, PrefixStore, StoreUnavailableError
from server.api.host_prefixes import HostPrefixes
from server.prefix import SHARED_PREFIX, ModelMismatchError, Prefix, PrefixRef, compose, shorten
from server.prefix.ids import is_user_prefix


def is_shareable(record: PrefixRecord) -> bool:
    """Reachable as `shared/<id>`: marked shared by the admin, and not a user prefix."""
    return record.shared and not is_user_prefix(record.prefix_id)


class PrefixNotFound(LookupError):
    """No such prefix for this tenant (also when another tenant has one: never reveal that)."""


class PrefixUnavailable(RuntimeError):
    """The store is unreachable and the prefix is not resident in host memory."""


class UntrainedCompositionError(ValueError):
    """A prefix put after other prefixes than the ones it was trained after."""


def check_composition(names: list[str], parts: list[Prefix], records: list[PrefixRecord | None],
                      admin_tenant: str) -> None:
    """Raise UntrainedCompositionError where a part's record says it was trained after other
    prefixes than the parts before it."""
    def describe(refs: tuple[PrefixRef, ...]) -> str:
        if not refs:
            return "no prefix"
        return " then ".join(shorten((SHARED_PREFIX if r.tenant == admin_tenant else "") + r.prefix_id)
                             + f" (version {r.version[:12]})" for r in refs)

    for i, (name, record) in enumerate(zip(names, records)):
        if record is None or record.trained_after is None:
            continue
        before = tuple(ref for part in parts[:i] for ref in part.refs)
        if before != record.trained_after:
            raise UntrainedCompositionError(
                f"prefix {shorten(name)} was trained after {describe(record.trained_after)}, but this request puts "
                f"it after {describe(before)}; it was never trained to read those keys and values. Send it after "
                "the prefixes it was trained after, train it again after these (POST /v1/users/<user>/personalize "
                "with base_prefix_id), or set allow_untrained_composition: true to serve it anyway")


class PrefixResolver:
    """Turns a tenant's prefix ids into one composed Prefix, loading what is not resident."""

    def __init__(self, store: PrefixStore, make_prefix: Callable[[torch.Tensor, tuple[PrefixRef, ...]], Prefix],
                 cache: HostPrefixes, model_fingerprint: str, *, admin_tenant: str = "admin",
                 shared_prefixes: bool = True,
                 on_stale: Callable[[str, str, str | None], None] | None = None,
                 max_concurrent_loads: int = 4, serving_dtype: torch.dtype | None = None,
                 with_heads: bool = False) -> None:
        self.store = store
        # a seq_cls model: prefixes may carry their own classifier head (make_prefix takes it)
        self.with_heads = with_heads
        self.make_prefix = make_prefix  # engine.make_prefix: checks once and casts to the engine dtype
        self.serving_dtype = serving_dtype  # the engine's dtype: loads read the store's copy in it
        self.cache = cache
        self.model_fingerprint = model_fingerprint
        self.admin_tenant = admin_tenant
        self.shared_prefixes = shared_prefixes
        self._loading: dict[PrefixRef, asyncio.Task] = {}
        self._load_threads = ThreadPoolExecutor(max_concurrent_loads, thread_name_prefix="prefix-load")
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

    async def resolve(self, tenant: str, names: list[str], allow_untrained_composition: bool = False) -> Prefix | None:
        """The composed prefix for `names` (in order); None for an empty list. Raises
        UntrainedCompositionError for a prefix put after others than it was trained after
        (unless allowed)."""
        if not names:
            return None
        resolved = [await self._resolve_one(tenant, name) for name in names]
        parts = [prefix for prefix, _ in resolved]
        if not allow_untrained_composition:
            check_composition(names, parts, [record for _, record in resolved], self.admin_tenant)
        if len(parts) == 1:
            return parts[0]
        key = tuple(r for p in parts for r in p.refs)
        composed = self.cache.get(key)
        if composed is None:
            composed = await asyncio.to_thread(compose, parts)
            self.cache.put(composed)
        return composed

    async def _resolve_one(self, tenant: str, name: str) -> tuple[Prefix, PrefixRecord | None]:
        """The prefix a name stands for and its current record (None: served from memory
        while the store is unreachable)."""
        owner, prefix_id = self.owner_of(tenant, name)
        try:  # InvalidIdError (a malformed id) goes to the caller as it is
            record = await asyncio.to_thread(self.record_of, tenant, name)
        except StoreUnavailableError as e:
            resident = self.cache.latest_resident(owner, prefix_id, shared_only=name.startswith(SHARED_PREFIX))
            if resident is not None:
                return resident, None
            raise PrefixUnavailable(f"prefix {shorten(name)} is not loaded on this server and the prefix store "
                                    "is unreachable; retry shortly") from e
        if record.model_fingerprint != self.model_fingerprint:
            raise ModelMismatchError(f"prefix {shorten(name)} was made for base model fingerprint "
                                 f"{record.model_fingerprint}; this server runs {self.model_fingerprint}")
        self.cache.note_version(record.ref, is_shareable(record))
        prefix = self.cache.get((record.ref,))
        if prefix is None:
            prefix = await self._load(record, name)
        return prefix, record

    async def _load(self, record: PrefixRecord, name: str) -> Prefix:
        # One load per version at a time, in its own task: concurrent requests for a cold
        # prefix share it, and a requester that goes away does not cancel it for the others.
        ref = record.ref
        task = self._loading.get(ref)
        if task is None:
            task = asyncio.ensure_future(self._fetch(record, name))
            self._loading[ref] = task
            task.add_done_callback(lambda t: self._loading.pop(ref, None) and (t.cancelled() or t.exception()))
        return await asyncio.shield(task)

    async def _fetch(self, record: PrefixRecord, name: str) -> Prefix:
        ref = record.ref
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        # A head, or a seq2seq prefix's encoder and cross parts (its record counts their
        # tokens), live in the stored file only: read it as stored (make_prefix casts).
        with_parts = bool(record.encoder_tokens or record.cross_tokens)
        try:
            if with_parts:
                got = await loop.run_in_executor(self._load_threads, partial(
                    self.store.get_version, ref.tenant, ref.prefix_id, ref.version, with_parts=True))
            elif self.with_heads:  # read as stored: the kv and its head (make_prefix casts the kv)
                got = await loop.run_in_executor(self._load_threads, self.store.get_version, ref.tenant,
                                                 ref.prefix_id, ref.version, True)
            else:
                got = await loop.run_in_executor(self._load_threads, self.store.get_serving, record,
                                                 self.serving_dtype)
        except StoreUnavailableError as e:
            raise PrefixUnavailable(f"prefix {shorten(name)} could not be loaded: the prefix store is "
                                    "unreachable; retry shortly") from e
        if got is None:  # replaced or deleted between the two reads, and its grace period is over
            raise PrefixNotFound(f"prefix {shorten(name)} not found (it was just replaced or deleted; retry)")
        if with_parts:
            make = partial(self.make_prefix, got.kv, (ref,), encoder_kv=got.encoder_kv, cross_kv=got.cross_kv)
        else:
            kv, head = got if self.with_heads else (got, None)
            make = partial(self.make_prefix, kv, (ref,), *((head,) if self.with_heads else ()))
        prefix = await loop.run_in_executor(self._load_threads, make)
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
        # Events published while we were disconnected are lost, so any host copy, and the
        # versions the outage fallback would serve, may be stale: drop them all. (Device
        # copies are keyed by version, and every resolve asks the store for the current one.)
        # Redis may have restarted, too: hash every tensor again on its next read.
        self.cache.clear()
        self.store.forget_verified()
