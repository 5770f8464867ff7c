"""prefix_store: the only code that knows Redis. Versioned prefixes, tenants, API keys, events."""

from prefix_store.errors import (
    NotReplicatedError,
    StoreIntegrityError,
    StoreUnavailableError,
    TenantDeletedError,
    TenantExistsError,
)
from prefix_store.record import PrefixEvent, PrefixRecord
from prefix_store.redis_process import RedisServer
from prefix_store.store import PrefixStore
from prefix_store.subscription import Subscription
from prefix_store.tenants import TenantSettings

__all__ = [
    "NotReplicatedError", "PrefixEvent", "PrefixRecord", "PrefixStore", "RedisServer",
    "StoreIntegrityError", "StoreUnavailableError", "Subscription", "TenantDeletedError", "TenantExistsError",
    "TenantSettings",
]
