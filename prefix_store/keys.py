"""Redis key names, and the id rules that make them safe.

Every key of one tenant carries the hash tag `{t:<tenant>}`, so in Redis Cluster all of
them live in one hash slot and a MULTI/EXEC over them stays legal. Tenant records and API
key hashes share the tag `{tenants}` for the same reason.

    ps:{t:acme}:prefixes                         hash  prefix id -> PrefixRecord JSON
    ps:{t:acme}:prefix:<id>:tensor:<version>     string  safetensors bytes of kv, as uploaded
    ps:{t:acme}:prefix:<id>:tensor:<version>:<dtype>
                                                 string  the same kv cast to a serving dtype
                                                         (bfloat16, float16 or float32): the
                                                         serving copy (record.serving_copies)
    ps:{t:acme}:incarnation                      string  the tenant's incarnation id, or the
                                                         tombstone "deleting" / "deleted"
    ps:{t:acme}:sync                             string  written just before a WAIT (expires in 60 s)
    ps:{t:acme}:usage                            hash  bytes, prefixes: what the tenant stores
    ps:{t:acme}:inflight                         zset  request id -> lease expiry (queue cap)
    ps:{t:acme}:bucket                           hash  tokens, ts: the token-rate bucket
    ps:{t:acme}:settings                         hash  the tenant's own settings (TenantSettings)
    ps:{tenants}:tenants                         hash  tenant id -> tenant JSON (key hash)
    ps:{tenants}:api_keys                        hash  sha256(api key) -> tenant id
    ps:{tenants}:sync                            string  as ps:{t:acme}:sync, for the directory
    ps:events                                    pub/sub channel of PrefixEvent JSON
    ps:tenant-events                             pub/sub channel of TenantEvent JSON
    (the job queue's keys, under the tag `{jobs}`, are named in job_queue.py)

Ids (their rules are in server/prefix/ids.py) never contain `{` or `}`, so the hash tag of a
key is always the tenant's. Versions are 16 hex digits and never end in a word of the key
grammar, so no two ids share a key; a serving copy's key ends in a dtype name, which is not
16 hex digits, so it is never another prefix's tensor key either.
"""

from __future__ import annotations

import re

from server.prefix.ids import InvalidIdError, validate_prefix_id, validate_tenant, validate_version

SERVING_DTYPE_NAMES = ("bfloat16", "float16", "float32")  # the dtypes a serving copy can have


def hash_tag(key: str) -> str:
    """The part of `key` Redis Cluster hashes (cluster spec: first `{...}` that is non-empty)."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1:end]
    return key


class Keys:
    """Builds every key and channel name under one namespace (default `ps`)."""

    def __init__(self, namespace: str = "ps"):
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", namespace):
            raise InvalidIdError("namespace", namespace, r"^[A-Za-z0-9_.-]{1,32}$")
        self.namespace = namespace

    def _tenant_base(self, tenant: str) -> str:
        return f"{self.namespace}:{{t:{validate_tenant(tenant)}}}"

    def prefixes(self, tenant: str) -> str:
        return f"{self._tenant_base(tenant)}:prefixes"

    def tensor(self, tenant: str, prefix_id: str, version: str) -> str:
        return (f"{self._tenant_base(tenant)}:prefix:{validate_prefix_id(prefix_id)}"
                f":tensor:{validate_version(version)}")

    def serving_copy(self, tenant: str, prefix_id: str, version: str, dtype_name: str) -> str:
        """The tensor of `version` cast to `dtype_name`; same slot as the tensor it came from."""
        if dtype_name not in SERVING_DTYPE_NAMES:
            raise ValueError(f"serving dtype must be one of {', '.join(SERVING_DTYPE_NAMES)}, got {dtype_name!r}")
        return f"{self.tensor(tenant, prefix_id, version)}:{dtype_name}"

    def incarnation(self, tenant: str) -> str:
        return f"{self._tenant_base(tenant)}:incarnation"

    def sync(self, tenant: str) -> str:
        return f"{self._tenant_base(tenant)}:sync"

    def usage(self, tenant: str) -> str:
        return f"{self._tenant_base(tenant)}:usage"

    def inflight(self, tenant: str) -> str:
        return f"{self._tenant_base(tenant)}:inflight"

    def token_bucket(self, tenant: str) -> str:
        return f"{self._tenant_base(tenant)}:bucket"

    def settings(self, tenant: str) -> str:
        return f"{self._tenant_base(tenant)}:settings"

    def tensor_pattern(self, tenant: str) -> str:
        """A SCAN pattern for every tensor key of a tenant, serving copies included (used
        when a tenant is deleted)."""
        return f"{self._tenant_base(tenant)}:prefix:*"

    def tenants(self) -> str:
        return f"{self.namespace}:{{tenants}}:tenants"

    def api_keys(self) -> str:
        return f"{self.namespace}:{{tenants}}:api_keys"

    def tenants_sync(self) -> str:
        return f"{self.namespace}:{{tenants}}:sync"

    def events(self) -> str:
        return f"{self.namespace}:events"

    def tenant_events(self) -> str:
        return f"{self.namespace}:tenant-events"
