"""One place that opens Redis clients (a single Redis or a Redis Cluster, chosen by the url),
turns their transport errors into StoreUnavailableError, and waits for replicas.

    redis://[:password@]host:port/db             one Redis (redis-py's Redis)
    redis+cluster://[:password@]h1:p1,h2:p2,...  a Redis Cluster (redis-py's RedisCluster);
                                                 any reachable node finds the others
    (rediss:// and rediss+cluster:// for TLS)

NOTE: the store's and the job queue's keys carry hash tags, so that every multi-key command,
MULTI/EXEC and Lua script touches one slot: `{t:<tenant>}` for a tenant's prefixes,
`{tenants}` for the tenant directory, `{jobs}` for the queue. Two things differ in a
cluster: PUBLISH cannot sit inside a cluster MULTI (it has no key), so events are
published right after the transaction, in both modes; and WAIT counts the replicas of
the node it is sent to, for the writes sent on the same connection, so
`wait_for_replicas` sends it to the slot's master, on one connection, after a write of
its own (see there).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from urllib.parse import unquote, urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import (AskError, ClusterDownError, MasterDownError, MovedError, ReadOnlyError,
                              RedisClusterException, TryAgainError)
from redis.retry import Retry

from prefix_store.errors import NotReplicatedError, StoreUnavailableError

# Short timeouts: a request for a cold prefix should fail fast (503) instead of hanging
# while Redis is away; resident prefixes do not touch Redis at all.
SOCKET_TIMEOUT_S = 2.0
HEALTH_CHECK_INTERVAL_S = 10
# A master being replaced (a cluster failover) answers CLUSTERDOWN / TRYAGAIN or not at all,
# a client whose node list is stale finds no node or is still redirected (MOVED) after its
# retries, a master that came back as a replica answers READONLY: all are "retry shortly".
TRANSPORT_ERRORS = (redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError,
                    ClusterDownError, MasterDownError, TryAgainError, AskError, RedisClusterException,
                    ReadOnlyError)
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}

Client = redis.Redis | RedisCluster

# Stands in for a write of the caller's on the caller's connection (see wait_for_replicas):
# KEYS[1] the slot's sync key; KEYS[2], if given, a key the caller's write created.
_BARRIER = """
if #KEYS > 1 and redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
redis.call('SET', KEYS[1], '1', 'PX', 60000)
return 1
"""


def redacted(url: str) -> str:
    """The url without its password, for error messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


def is_cluster_url(url: str) -> bool:
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def make_client(url: str) -> Client:
    """A client for `url`. A cluster is contacted at once (to learn its nodes): unreachable,
    it raises StoreUnavailableError; a single Redis connects on first use."""
    if is_cluster_url(url):
        return _make_cluster_client(url)
    # One quick retry absorbs a connection that went stale while Redis restarted; more
    # would only delay the 503 when Redis is really down.
    return redis.Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=SOCKET_TIMEOUT_S,
        health_check_interval=HEALTH_CHECK_INTERVAL_S,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 1),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


def _make_cluster_client(url: str) -> RedisCluster:
    parts = urlsplit(url)
    if parts.path not in ("", "/", "/0"):
        raise ValueError(f"a Redis Cluster has only database 0; {redacted(url)} names {parts.path!r}")
    hosts = parts.netloc.rsplit("@", 1)[-1]
    nodes = []
    for address in hosts.split(","):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{redacted(url)}: expected host:port[,host:port...], got {address!r}")
        nodes.append(ClusterNode(host.strip("[]"), int(port)))
    try:
        return RedisCluster(
            startup_nodes=nodes,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            ssl=CLUSTER_SCHEMES[parts.scheme] == "rediss",
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=SOCKET_TIMEOUT_S,
            # a few quick retries ride over a moved slot or a refreshed node list; a failover
            # takes seconds (cluster-node-timeout and the election): callers get a 503 meanwhile
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 3),
        )
    except TRANSPORT_ERRORS as e:
        raise StoreUnavailableError(f"Redis Cluster at {redacted(url)} is unreachable: {e}") from e


@contextlib.contextmanager
def unavailable_as_error(url: str) -> Iterator[None]:
    try:
        yield
    except TRANSPORT_ERRORS as e:
        raise StoreUnavailableError(f"Redis at {redacted(url)} is unreachable: {e}") from e


def wait_for_replicas(client: Client, sync_key: str, replicas: int, timeout_ms: int,
                      created_key: str | None = None) -> None:
    """Return once the writes already acknowledged to us in `sync_key`'s slot are on
    `replicas` replicas of its master; raise NotReplicatedError otherwise.

    WAIT waits for the writes made on its own connection, and our client hands out a
    connection per command. So on one connection to the slot's master this writes a
    short-lived `sync_key` (after ours in the master's replication stream: a replica that
    has it has ours), then sends WAIT. `created_key` guards the one gap: a failover between
    our write and this call promotes a replica that may lack our write; the key it names
    must then still exist on the new master, or the write was lost and we say so.
    """
    if replicas <= 0:
        return
    keys = [sync_key] + ([created_key] if created_key else [])
    for attempt in range(3):
        node = _master_of(client, sync_key)
        try:
            with node.pipeline(transaction=False) as pipe:
                pipe.eval(_BARRIER, len(keys), *keys)
                pipe.execute_command("WAIT", replicas, timeout_ms)
                present, acked = pipe.execute()
            break
        except (MovedError, AskError, redis.ConnectionError, redis.TimeoutError):
            # the slot has a new master (a failover): learn it and try there
            if not isinstance(client, RedisCluster) or attempt == 2:
                raise
            client.nodes_manager.initialize()
    if not present:
        raise NotReplicatedError("the write was lost in a failover of its Redis master before it reached a "
                                 "replica; nothing was acknowledged: send it again")
    if int(acked) < replicas:
        raise NotReplicatedError(f"the write reached {acked} of the {replicas} Redis replica(s) required within "
                                 f"{timeout_ms} ms; it may not survive a failover: send it again (a repeated "
                                 "write is harmless)")


def _master_of(client: Client, key: str) -> redis.Redis:
    """A plain client of the master that serves `key` (the client itself for one Redis)."""
    if isinstance(client, RedisCluster):
        return client.get_redis_connection(client.get_node_from_key(key))
    return client
