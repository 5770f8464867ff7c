"""One place that opens Redis clients and turns their transport errors into StoreUnavailableError."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from prefix_store.errors import StoreUnavailableError

# Short timeouts: a request for a cold prefix should fail fast (503) instead of hanging
# while Redis is away; resident prefixes do not touch Redis at all.
SOCKET_TIMEOUT_S = 2.0
HEALTH_CHECK_INTERVAL_S = 10
TRANSPORT_ERRORS = (redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError)


def redacted(url: str) -> str:
    """The url without its password, for error messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


def make_client(url: str) -> redis.Redis:
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


@contextlib.contextmanager
def unavailable_as_error(url: str) -> Iterator[None]:
    try:
        yield
    except TRANSPORT_ERRORS as e:
        raise StoreUnavailableError(f"Redis at {redacted(url)} is unreachable: {e}") from e
