"""PrefixStore: versioned, tenant-namespaced prefixes in Redis or Redis Cluster (synchronous;
the API calls it through asyncio.to_thread).

NOTE: the invariant is that a reader never sees metadata without its tensor, nor half of a
replace. A put writes the new version's tensor, the metadata that points at it and the
expiry of the old version's tensor in one MULTI/EXEC, guarded by WATCH on the tenant's
index (a concurrent writer to the same tenant makes us retry); every key of it carries the
tenant's hash tag, so it is one slot in a cluster. The event follows the EXEC (a cluster
MULTI cannot carry PUBLISH); it only saves replicas a stale copy's memory, since every
request reads the current version anyway. The old tensor stays readable for
`old_version_grace_s`, so a reader that fetched the old metadata just before the swap still
gets the tensor it names; every tensor read is checked against the version hash in the
metadata.

Serving copies: a put given the server's `serving_dtype` also writes the tensor cast to it
under its own key (Keys.serving_copy) and records that copy's content hash in the record,
in the same MULTI/EXEC; a read for serving (get_serving) takes the copy when the record
names one, checked against that hash, and otherwise reads the tensor as stored, casts it
and writes the copy for the next reader (one transaction, guarded by WATCH on the index,
only while the record still names that version). The version is always the hash of the
tensor as uploaded, so it does not depend on any server's dtype. Every key of a version
(the tensor and a copy of each dtype) expires together on replace and delete. A current
record names only copies whose key has no expiry.

Each process hashes the bytes of a (key, version) once (verified_versions.py says what
that assumes); later reads of the same bytes skip the sha256.

Durability: with `wait_replicas` > 0, a write (put, delete, tenant create/rotate/delete)
returns only once the slot's master has it on that many replicas (WAIT), else raises
NotReplicatedError; so a failover that promotes one of them keeps every acknowledged write.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Iterator

import redis
import torch

from prefix_store import codec, storage_usage
from prefix_store.connection import make_client, unavailable_as_error, wait_for_replicas
from prefix_store.errors import (NotReplicatedError, StoreIntegrityError, StoreUnavailableError, TenantDeletedError,
                                 TenantExistsError)
from prefix_store.keys import SERVING_DTYPE_NAMES, Keys
from prefix_store.tenant_limits import StorageUsage, TenantLimits
from server.prefix import ClassifierHead, PrefixRef
from server.prefix.ids import validate_prefix_id, validate_tenant, validate_version
from prefix_store.record import PrefixEvent, PrefixRecord, TenantEvent
from prefix_store.subscription import Subscription
from prefix_store.tenants import TenantDirectory, TenantSettings
from prefix_store.verified_versions import VerifiedVersions

log = logging.getLogger(__name__)

MAX_DESCRIPTION_CHARS = 4096
PREFIX_KINDS = ("tuned", "prompt")  # PrefixRecord.kind
# The tenant's incarnation key holds one of these while (and after) the tenant is deleted.
DELETING, DELETED = b"deleting", b"deleted"


class PrefixStore:
    def __init__(self, redis_url: str, namespace: str = "ps", old_version_grace_s: int = 300,
                 wait_replicas: int = 0, wait_timeout_ms: int = 1000):
        if wait_replicas < 0 or wait_timeout_ms < 1:
            raise ValueError(f"wait_replicas ({wait_replicas}) must be >= 0 and wait_timeout_ms "
                             f"({wait_timeout_ms}) >= 1")
        self.redis_url = redis_url
        self.keys = Keys(namespace)
        self.old_version_grace_s = old_version_grace_s
        self.wait_replicas = wait_replicas  # replicas that must hold a write before it is acknowledged
        self.wait_timeout_ms = wait_timeout_ms
        self._r = make_client(redis_url)
        self._tenants = TenantDirectory(self._r, self.keys)
        self.errors = 0  # operations that found Redis unreachable (metrics: store_errors_total)
        self.verified = VerifiedVersions()  # (key, version, length) already hashed by this process

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            with unavailable_as_error(self.redis_url):
                yield
        except StoreUnavailableError:
            self.errors += 1
            raise

    # ---- prefixes -------------------------------------------------------------------------

    def put(self, tenant: str, prefix_id: str, kv: torch.Tensor, *, model_fingerprint: str,
            description: str = "", incarnation: str | None = None, shared: bool = False,
            kind: str = "tuned", limits: TenantLimits | None = None,
            trained_after: tuple[PrefixRef, ...] | None = None,
            head: ClassifierHead | None = None,
            serving_dtype: torch.dtype | None = None,
            encoder_kv: torch.Tensor | None = None,
            cross_kv: torch.Tensor | None = None) -> tuple[PrefixRecord, bool]:
        """Store kv [L, 2, Hkv, P, hd] (with a classification prefix's `head`, or a seq2seq
        prefix's `encoder_kv` and `cross_kv` parts, in the same tensor file) as the new
        version of `prefix_id`; (record, created).
        Given `serving_dtype` (the dtype the calling server serves in) other than kv's, a
        copy cast to it is stored too (see the module's note); not for a prefix with a head
        or with seq2seq parts, which is read as stored (heads are applied in float32; the
        seq2seq engine casts its parts).

        Raises TenantDeletedError when the tenant is being or was deleted, or, given
        `incarnation` (tenant_incarnation() read when the work started), when the tenant
        was deleted and created again since. Given `limits`, raises QuotaExceededError
        (storing nothing) when the write would take the tenant past its storage quota.
        """
        validate_tenant(tenant)
        validate_prefix_id(prefix_id)
        if not isinstance(model_fingerprint, str) or not model_fingerprint:
            raise ValueError("model_fingerprint must be a non-empty string")
        if not isinstance(description, str):
            raise ValueError(f"description must be a string, got {type(description).__name__}")
        if kind not in PREFIX_KINDS:
            raise ValueError(f"kind must be one of {', '.join(PREFIX_KINDS)}, got {kind!r}")
        if len(description) > MAX_DESCRIPTION_CHARS:
            raise ValueError(f"description has {len(description)} characters; the limit is "
                             f"{MAX_DESCRIPTION_CHARS}")
        head = None if head is None else head.on_host()  # stored (and counted) in float32
        data, version = codec.encode(kv, head, encoder_kv, cross_kv)
        parts = [t for t in (encoder_kv, cross_kv) if t is not None]
        copy = None  # (dtype name, bytes, version) of the serving copy
        if serving_dtype is not None and serving_dtype != kv.dtype and head is None and not parts:
            copy = (codec.dtype_name(serving_dtype), *codec.encode(kv.to(serving_dtype)))
        layers, _, heads, plen, head_dim = kv.shape
        record = PrefixRecord(
            tenant=tenant, prefix_id=prefix_id, version=version, num_virtual_tokens=int(plen),
            num_layers=int(layers), num_kv_heads=int(heads), head_dim=int(head_dim),
            dtype=str(kv.dtype).removeprefix("torch."),
            bytes=sum(t.numel() * t.element_size() for t in (kv, *parts)) + (0 if head is None else head.nbytes),
            created_at=time.time(), description=description, model_fingerprint=model_fingerprint,
            shared=bool(shared), kind=kind,
            trained_after=None if trained_after is None else tuple(trained_after),
            encoder_tokens=0 if encoder_kv is None else int(encoder_kv.shape[3]),
            cross_tokens=0 if cross_kv is None else int(cross_kv.shape[3]))
        index = self.keys.prefixes(tenant)
        marker = self.keys.incarnation(tenant)
        event = PrefixEvent("put", tenant, prefix_id, version)

        def tx(pipe: redis.client.Pipeline) -> tuple[PrefixRecord | None, PrefixRecord]:
            current = pipe.get(marker)
            if current in (DELETING, DELETED) or (incarnation is not None and current != incarnation.encode()):
                raise TenantDeletedError(f"tenant {tenant!r} was deleted; prefix {prefix_id!r} is not stored")
            old_raw = pipe.hget(index, prefix_id)
            old = PrefixRecord.from_json(old_raw) if old_raw is not None else None
            usage = storage_usage.read_usage(pipe, self.keys, tenant)
            after = storage_usage.usage_after_put(usage, old, record.bytes)
            if limits is not None:
                storage_usage.check_quota(tenant, prefix_id, record.bytes, usage, after, limits)
            # the same version again keeps its copies (current, so their keys have no expiry)
            copies = dict(old.serving_copies) if old is not None and old.version == version else {}
            if copy is not None:
                copies[copy[0]] = copy[2]
            stored = dataclasses.replace(record, serving_copies=copies)
            pipe.multi()
            storage_usage.write_usage(pipe, self.keys, tenant, after)
            # a plain SET also clears a grace TTL if this version is uploaded again
            pipe.set(self.keys.tensor(tenant, prefix_id, version), data)
            if copy is not None:
                pipe.set(self.keys.serving_copy(tenant, prefix_id, version, copy[0]), copy[1])
            pipe.hset(index, prefix_id, stored.to_json())
            if old is not None and old.version != version:
                for key in self._version_keys(tenant, prefix_id, old.version):
                    pipe.expire(key, self.old_version_grace_s)
            return old, stored

        with self._guard():
            old, record = self._r.transaction(tx, index, marker, value_from_callable=True)
            self._replicated(tenant, created_key=self.keys.tensor(tenant, prefix_id, version))
            self._r.publish(self.keys.events(), event.to_json())
        return record, old is None

    def get_record(self, tenant: str, prefix_id: str) -> PrefixRecord | None:
        validate_tenant(tenant)
        validate_prefix_id(prefix_id)
        with self._guard():
            raw = self._r.hget(self.keys.prefixes(tenant), prefix_id)
        return PrefixRecord.from_json(raw) if raw is not None else None

    def get(self, tenant: str, prefix_id: str) -> tuple[PrefixRecord, torch.Tensor] | None:
        """The current version: its record and kv [L, 2, Hkv, P, hd]; None if there is none."""
        record = None
        for _ in range(3):
            record = self.get_record(tenant, prefix_id)
            if record is None:
                return None
            kv = self.get_version(tenant, prefix_id, record.version)
            if kv is not None:
                return record, kv
            # the tensor left between our two reads (replaced, grace over): read the metadata again
        raise StoreIntegrityError(
            f"prefix {prefix_id!r} of tenant {tenant!r}: metadata names version {record.version} "
            "but its tensor is missing (was it evicted? run Redis with maxmemory-policy noeviction)")

    def get_version(self, tenant: str, prefix_id: str, version: str, with_head: bool = False,
                    with_parts: bool = False):
        """The tensor of exactly this version (also shortly after it was replaced), or None;
        with_head: (kv, its classifier head or None), or None; with_parts: every tensor of the
        file as a codec.StoredTensors (kv, head, encoder_kv, cross_kv), or None."""
        key = self.keys.tensor(tenant, prefix_id, validate_version(version))
        what = f"prefix {prefix_id!r} of tenant {tenant!r}"
        return self._read(key, version, what, "all" if with_parts else "head" if with_head else "kv")

    def get_serving(self, record: PrefixRecord, dtype: torch.dtype | None) -> torch.Tensor | None:
        """The kv of `record`'s version in `dtype` (None: as stored); None when the version
        is gone (replaced or deleted, grace over). Reads the serving copy the record names
        (checked against its hash; its dtype and shape must be the record's); without one,
        reads the tensor as stored, casts it and stores the copy for the next reader."""
        tenant, prefix_id, version = record.tenant, record.prefix_id, record.version
        if dtype is None or codec.dtype_name(dtype) == record.dtype:
            return self.get_version(tenant, prefix_id, version)
        name = codec.dtype_name(dtype)
        copy_version = record.serving_copies.get(name)
        if copy_version is not None:
            what = f"prefix {prefix_id!r} of tenant {tenant!r}, {name} copy of version {version}"
            kv = self._read(self.keys.serving_copy(tenant, prefix_id, version, name), validate_version(copy_version),
                            what)
            if kv is not None:
                if kv.dtype != dtype or tuple(kv.shape) != record.shape:
                    raise StoreIntegrityError(f"{what}: holds {codec.dtype_name(kv.dtype)} {tuple(kv.shape)}, "
                                              f"expected {name} {record.shape}")
                return kv
            # the copy went with its version (replaced or deleted): so, likely, did the tensor
        kv = self.get_version(tenant, prefix_id, version)
        if kv is None:
            return None
        kv = kv.to(dtype)
        if copy_version is None:
            self._add_serving_copy(record, kv)
        return kv

    def _read(self, key: str, version: str, what: str, tensors: str = "kv"):
        """The tensor under `key`, refused unless its bytes hash to `version` (hashed once
        per process for the same key, version and length: verified_versions.py); tensors
        "head": (kv, its classifier head or None); "all": a codec.StoredTensors."""
        with self._guard():
            data = self._r.get(key)
        if data is None:
            return None
        try:
            if not self.verified.contains(key, version, len(data)):
                codec.check_version(data, version)
                self.verified.add(key, version, len(data))
            return {"kv": codec.load, "head": codec.load_parts, "all": codec.load_all}[tensors](data)
        except ValueError as e:
            raise StoreIntegrityError(f"{what}: {e}") from e

    def _add_serving_copy(self, record: PrefixRecord, kv: torch.Tensor) -> None:
        """Store `kv` (record's tensor cast to a serving dtype) as that version's copy and
        name it in the record, if the record still names this version and no such copy;
        best effort: a failure only means the next reader casts again."""
        name = codec.dtype_name(kv.dtype)
        data, copy_version = codec.encode(kv)
        index = self.keys.prefixes(record.tenant)
        copy_key = self.keys.serving_copy(record.tenant, record.prefix_id, record.version, name)

        def tx(pipe: redis.client.Pipeline) -> None:
            raw = pipe.hget(index, record.prefix_id)
            if raw is None:
                return
            # edit the JSON as stored: fields a newer writer added survive
            fields = json.loads(raw)
            copies = fields.get("serving_copies") or {}
            if fields.get("version") != record.version or name in copies:
                return  # replaced or deleted meanwhile (its keys may be expiring), or done by another reader
            fields["serving_copies"] = {**copies, name: copy_version}
            pipe.multi()
            pipe.set(copy_key, data)
            pipe.hset(index, record.prefix_id, json.dumps(fields, separators=(",", ":"), sort_keys=True))

        try:
            with self._guard():
                self._r.transaction(tx, index)
        except (StoreUnavailableError, redis.RedisError) as e:
            log.warning("prefix %r of tenant %r: the %s copy of version %s was not stored (%s); the next load "
                        "casts again", record.prefix_id, record.tenant, name, record.version, e)

    def _version_keys(self, tenant: str, prefix_id: str, version: str) -> list[str]:
        """Every key of one version: its tensor and a serving copy of each dtype (there may
        be none: EXPIRE of a missing key does nothing)."""
        return [self.keys.tensor(tenant, prefix_id, version),
                *(self.keys.serving_copy(tenant, prefix_id, version, name) for name in SERVING_DTYPE_NAMES)]

    def forget_verified(self) -> None:
        """Hash every tensor again on its next read (after a reconnect: Redis may have restarted)."""
        self.verified.clear()

    def list(self, tenant: str) -> list[PrefixRecord]:
        """The tenant's prefixes, sorted by id."""
        validate_tenant(tenant)
        with self._guard():
            raw = self._r.hgetall(self.keys.prefixes(tenant))
        return sorted((PrefixRecord.from_json(v) for v in raw.values()), key=lambda r: r.prefix_id)

    def delete(self, tenant: str, prefix_id: str) -> bool:
        """Remove a prefix; False if it did not exist. Its tensor (and serving copies) expire
        after the grace period."""
        validate_tenant(tenant)
        validate_prefix_id(prefix_id)
        index = self.keys.prefixes(tenant)

        def tx(pipe: redis.client.Pipeline) -> PrefixRecord | None:
            raw = pipe.hget(index, prefix_id)
            if raw is None:
                return None
            old = PrefixRecord.from_json(raw)
            usage = storage_usage.read_usage(pipe, self.keys, tenant)
            pipe.multi()
            storage_usage.write_usage(pipe, self.keys, tenant, storage_usage.usage_after_delete(usage, old))
            pipe.hdel(index, prefix_id)
            for key in self._version_keys(tenant, prefix_id, old.version):
                pipe.expire(key, self.old_version_grace_s)
            return old

        with self._guard():
            old = self._r.transaction(tx, index, value_from_callable=True)
            if old is None:
                return False
            self._replicated(tenant)
            self._r.publish(self.keys.events(), PrefixEvent("delete", tenant, prefix_id, old.version).to_json())
        return True

    def storage_usage(self, tenant: str) -> StorageUsage:
        """What the tenant stores now (bytes of prefix tensors, prefix count)."""
        validate_tenant(tenant)
        with self._guard():
            return storage_usage.read_usage(self._r, self.keys, tenant)

    # ---- tenants and API keys --------------------------------------------------------------

    def create_tenant(self, tenant_id: str) -> str:
        """A new tenant; returns its API key (shown once, stored only as a hash)."""
        validate_tenant(tenant_id)
        incarnation = uuid.uuid4().hex
        with self._guard():
            if self._r.get(self.keys.incarnation(tenant_id)) == DELETING:
                raise TenantExistsError(f"tenant {tenant_id!r} is still being deleted; retry in a moment")
            api_key = self._tenants.create(tenant_id, incarnation)
            self._r.set(self.keys.incarnation(tenant_id), incarnation)
            try:
                self._replicated(tenant_id)  # after the incarnation, in the tenant's slot...
                self._replicated(None)  # ...and the key, in the directory's
            except NotReplicatedError as e:
                raise NotReplicatedError(f"tenant {tenant_id!r} was written but not confirmed: {e}; its key "
                                         "cannot be shown now: rotate the tenant's key to get one") from e
        return api_key

    def tenant_incarnation(self, tenant_id: str) -> str | None:
        """The id of this life of the tenant (a new one each time the name is created), to
        hand to put() by work that outlives a request (a training job); None for tenants
        made before incarnations existed and the admin tenant, which has no record."""
        with self._guard():
            value = self._r.get(self.keys.incarnation(validate_tenant(tenant_id)))
        return None if value in (None, DELETING, DELETED) else value.decode()

    def tenant_settings(self, tenant_id: str) -> TenantSettings:
        """The tenant's settings (the defaults until it changes one)."""
        with self._guard():
            return TenantSettings.from_hash(self._r.hgetall(self.keys.settings(validate_tenant(tenant_id))))

    def update_tenant_settings(self, tenant_id: str, settings: TenantSettings) -> TenantSettings:
        with self._guard():
            self._r.hset(self.keys.settings(validate_tenant(tenant_id)), mapping=settings.to_hash())
        return settings

    def rotate_key(self, tenant_id: str) -> str | None:
        """A new API key for the tenant (shown once; stored hashed); the old one stops working
        at once here, and on every replica when it hears the event. None: no such tenant."""
        with self._guard():
            api_key = self._tenants.rotate_key(tenant_id)
            if api_key is not None:
                self._r.publish(self.keys.tenant_events(), TenantEvent("key_rotated", tenant_id).to_json())
                try:
                    self._replicated(None)
                except NotReplicatedError as e:
                    raise NotReplicatedError(f"the key of tenant {tenant_id!r} was changed but not confirmed: {e}; "
                                             "the old key no longer works: rotate again to get a new one") from e
        return api_key

    def set_tenant_limits(self, tenant_id: str, overrides: dict[str, int]) -> bool:
        """Store the tenant's limit overrides (see TenantLimits); False if no such tenant."""
        with self._guard():
            return self._tenants.set_limits(tenant_id, overrides)

    def tenant_limit_overrides(self, tenant_id: str) -> dict[str, int] | None:
        """The limits the admin set for the tenant ({} for none); None if no such tenant."""
        with self._guard():
            return self._tenants.limit_overrides(tenant_id)

    def tenant_for_key(self, api_key: str) -> str | None:
        with self._guard():
            return self._tenants.tenant_for_key(api_key)

    def tenant_exists(self, tenant_id: str) -> bool:
        with self._guard():
            return self._tenants.exists(tenant_id)

    def list_tenants(self) -> list[str]:
        with self._guard():
            return self._tenants.list()

    def delete_tenant(self, tenant_id: str) -> bool:
        """Remove the tenant, its key and all its prefixes (user prefixes included, with a
        delete event for each); False, touching nothing, if there is no such tenant.

        Its key stops working first. Then the tenant is marked deleting, so that no write
        (an upload in flight, a training job finishing) can land while its prefixes are
        removed, nor afterwards: the mark stays as a tombstone until the name is created
        again, and a job from the old life (put with its incarnation) is refused then too.
        Calling it again after a failure part-way finishes the work.
        """
        validate_tenant(tenant_id)
        marker = self.keys.incarnation(tenant_id)
        with self._guard():
            existed = self._tenants.delete(tenant_id)
            if not existed and self._r.get(marker) != DELETING:
                return False
            # the key is gone from Redis (replicated, so a failover cannot bring it back);
            # replicas drop their remembered copy when they hear this
            self._replicated(None)
            self._r.publish(self.keys.tenant_events(), TenantEvent("deleted", tenant_id).to_json())
            self._r.set(marker, DELETING)
            for record in self.list(tenant_id):
                self.delete(tenant_id, record.prefix_id)
            # no reader can reach these any more; do not wait for the grace period
            for key in self._r.scan_iter(match=self.keys.tensor_pattern(tenant_id), count=500):
                self._r.unlink(key)
            self._r.unlink(self.keys.usage(tenant_id), self.keys.inflight(tenant_id), self.keys.token_bucket(tenant_id),
                           self.keys.settings(tenant_id))
            self._r.set(marker, DELETED)
            self._replicated(tenant_id)
        return True

    def _replicated(self, tenant: str | None, created_key: str | None = None) -> None:
        """Wait for the writes already made in `tenant`'s slot (None: the tenant directory's)
        to reach `wait_replicas` replicas; see connection.wait_for_replicas."""
        sync_key = self.keys.sync(tenant) if tenant is not None else self.keys.tenants_sync()
        wait_for_replicas(self._r, sync_key, self.wait_replicas, self.wait_timeout_ms, created_key)

    # ---- events and health -----------------------------------------------------------------

    def subscribe(self, callback, on_reconnect=None, wait_s: float = 2.0, on_tenant_event=None) -> Subscription:
        """Deliver every PrefixEvent to `callback` (and every TenantEvent to
        `on_tenant_event`, if given) on a background thread; `.close()` ends it.

        Waits up to `wait_s` for the subscription to be active (it keeps trying in the
        background if Redis is down; see `Subscription.wait_ready`).
        """
        handlers = {self.keys.events(): (PrefixEvent.from_json, callback)}
        if on_tenant_event is not None:
            handlers[self.keys.tenant_events()] = (TenantEvent.from_json, on_tenant_event)
        sub = Subscription(self._r, handlers, on_reconnect)
        sub.wait_ready(wait_s)
        return sub

    def durability(self) -> str | None:
        """What in the Redis configuration can lose an acknowledged write ("appendfsync is
        everysec"); None when every write is on disk before the reply, or when the server does
        not let us read its configuration (managed services rename CONFIG)."""
        try:
            with self._guard():
                config = self._r.config_get("append*")
        except (StoreUnavailableError, redis.RedisError):
            return None
        if config.get("appendonly") != "yes":
            return "runs without an append-only file (appendonly no)"
        if config.get("appendfsync") != "always":
            return f"fsyncs its append-only file {config.get('appendfsync')!r}, not on every write"
        return None

    def ping(self) -> bool:
        try:
            with self._guard():
                return bool(self._r.ping())
        except (StoreUnavailableError, redis.RedisError):  # e.g. NOAUTH: not ready either
            return False

    def close(self) -> None:
        self._r.close()

    def __enter__(self) -> "PrefixStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
