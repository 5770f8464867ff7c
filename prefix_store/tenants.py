"""Tenants and their API keys. A key is shown once; Redis holds only its sha256."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, fields

import redis

from prefix_store.errors import TenantExistsError
from prefix_store.keys import Keys
from prefix_store.tenant_limits import TenantLimits
from server.prefix.ids import validate_tenant

API_KEY_PREFIX = "ps-"
API_KEY_LENGTH = len(API_KEY_PREFIX) + 32  # token_urlsafe(24) gives 32 characters


@dataclass(frozen=True)
class TenantSettings:
    """What a tenant chooses for its own requests (PATCH /v1/tenant/settings)."""

    # On the OpenAI routes, OpenAI's `user` field selects that end user's personalized
    # prefix `user:<user>` (when it has one), as the `user_id` extension does.
    openai_user_prefix: bool = False

    def to_hash(self) -> dict[str, str]:
        return {f.name: "1" if getattr(self, f.name) else "0" for f in fields(self)}

    @classmethod
    def from_hash(cls, h: dict) -> "TenantSettings":
        known = {f.name for f in fields(cls)}
        values = {(k.decode() if isinstance(k, bytes) else k): v for k, v in h.items()}
        return cls(**{k: v in (b"1", "1") for k, v in values.items() if k in known})


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(24)


def key_hash(api_key: str) -> str:
    # A plain hash is enough: keys carry 192 random bits, so there is nothing to brute-force
    # and no need for a slow password hash on every request.
    return hashlib.sha256(api_key.encode()).hexdigest()


class TenantDirectory:
    """Tenant records in `ps:{tenants}:tenants`, key hashes in `ps:{tenants}:api_keys`.

    Both hashes share a hash tag, so each change is one MULTI/EXEC even in Redis Cluster.
    Callers wrap calls in `unavailable_as_error` (PrefixStore does).
    """

    def __init__(self, client: redis.Redis, keys: Keys):
        self._r = client
        self._keys = keys

    def create(self, tenant: str, incarnation: str) -> str:
        validate_tenant(tenant)
        api_key = new_api_key()
        record = json.dumps({"tenant_id": tenant, "created_at": time.time(), "key_hash": key_hash(api_key),
                             "incarnation": incarnation})

        def tx(pipe: redis.client.Pipeline) -> None:
            if pipe.hexists(self._keys.tenants(), tenant):
                raise TenantExistsError(f"tenant {tenant!r} already exists; delete it first or "
                                        "rotate its key")
            pipe.multi()
            pipe.hset(self._keys.tenants(), tenant, record)
            pipe.hset(self._keys.api_keys(), key_hash(api_key), tenant)

        self._r.transaction(tx, self._keys.tenants())
        return api_key

    def rotate_key(self, tenant: str) -> str | None:
        """A new key for `tenant`; the old one stops working at once. None if no such tenant."""
        validate_tenant(tenant)
        api_key = new_api_key()

        def tx(pipe: redis.client.Pipeline) -> bool:
            raw = pipe.hget(self._keys.tenants(), tenant)
            if raw is None:
                return False
            record = json.loads(raw)
            old_hash, record["key_hash"] = record["key_hash"], key_hash(api_key)
            pipe.multi()
            pipe.hdel(self._keys.api_keys(), old_hash)
            pipe.hset(self._keys.api_keys(), record["key_hash"], tenant)
            pipe.hset(self._keys.tenants(), tenant, json.dumps(record))
            return True

        found = self._r.transaction(tx, self._keys.tenants(), value_from_callable=True)
        return api_key if found else None

    def set_limits(self, tenant: str, overrides: dict[str, int]) -> bool:
        """Store the tenant's limit overrides (field -> value; the others take the server's
        defaults), replacing earlier ones. False if there is no such tenant."""
        validate_tenant(tenant)
        TenantLimits().overridden(overrides)  # names and values checked before anything is written

        def tx(pipe: redis.client.Pipeline) -> bool:
            raw = pipe.hget(self._keys.tenants(), tenant)
            if raw is None:
                return False
            record = json.loads(raw)
            record["limits"] = dict(overrides)
            pipe.multi()
            pipe.hset(self._keys.tenants(), tenant, json.dumps(record))
            return True

        return bool(self._r.transaction(tx, self._keys.tenants(), value_from_callable=True))

    def limit_overrides(self, tenant: str) -> dict[str, int] | None:
        """The limits the admin set for the tenant ({} for none); None if there is no such tenant."""
        raw = self._r.hget(self._keys.tenants(), validate_tenant(tenant))
        return None if raw is None else dict(json.loads(raw).get("limits") or {})

    def tenant_for_key(self, api_key: str) -> str | None:
        if not isinstance(api_key, str) or len(api_key) != API_KEY_LENGTH or not api_key.startswith(API_KEY_PREFIX):
            return None
        digest = key_hash(api_key)
        tenant = self._r.hget(self._keys.api_keys(), digest)
        if tenant is None:
            return None
        raw = self._r.hget(self._keys.tenants(), tenant)
        if raw is None:
            return None
        # the index lookup already matched; comparing against the tenant's own record also
        # rejects a stale index entry left by a concurrent rotation, in constant time
        if not hmac.compare_digest(json.loads(raw)["key_hash"], digest):
            return None
        return tenant.decode()

    def exists(self, tenant: str) -> bool:
        return bool(self._r.hexists(self._keys.tenants(), validate_tenant(tenant)))

    def list(self) -> list[str]:
        return sorted(t.decode() for t in self._r.hkeys(self._keys.tenants()))

    def delete(self, tenant: str) -> bool:
        """Removes the tenant and its key (not its prefixes: PrefixStore.delete_tenant does both)."""
        validate_tenant(tenant)

        def tx(pipe: redis.client.Pipeline) -> bool:
            raw = pipe.hget(self._keys.tenants(), tenant)
            if raw is None:
                return False
            pipe.multi()
            pipe.hdel(self._keys.tenants(), tenant)
            pipe.hdel(self._keys.api_keys(), json.loads(raw)["key_hash"])
            return True

        return bool(self._r.transaction(tx, self._keys.tenants(), value_from_callable=True))
