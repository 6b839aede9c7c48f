"""The one way a service makes its Redis client (NMS cluster state, TRS CID table).

Every command and every connect is bounded by ``timeout_s`` (a Redis that stops answering
must not hang a replica), TCP keepalive is on, and a connection idle for
``HEALTH_CHECK_S`` is checked with a PING before it is used again (a NAT or a failover may
have dropped it silently). A command whose connection turns out dead (Redis restarted) is
sent again on a new one, up to ``RECONNECT_RETRIES`` times, a few tens of milliseconds
apart, instead of failing the request that happened to use it first. At most
``MAX_CONNECTIONS`` are open; a command beyond them waits for one (up to ``timeout_s``)
rather than failing: redis-py's default pool raised ``Too many connections`` at once, which
in a reconnect storm failed thousands of registrations and departures (each then retried
by its node with a new handshake). Redis runs one command at a time: more connections
would not make it answer sooner.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis.asyncio as redis_asyncio

TIMEOUT_S = 5.0
HEALTH_CHECK_S = 15.0
RECONNECT_RETRIES = 3
MAX_CONNECTIONS = 100


def redis_client(url: str, *, timeout_s: float = TIMEOUT_S) -> redis_asyncio.Redis:
    """A ``redis.asyncio.Redis`` on ``url`` (``redis://[:password@]host:port/db``)."""
    import redis.asyncio as redis_asyncio
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError

    pool = redis_asyncio.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        socket_keepalive=True,
        health_check_interval=HEALTH_CHECK_S,
        # Connection errors only: a command that timed out is not sent again.
        retry=Retry(
            ExponentialBackoff(cap=0.5, base=0.05),
            RECONNECT_RETRIES,
            supported_errors=(RedisConnectionError,),
        ),
        retry_on_error=[RedisConnectionError],
    )
    return redis_asyncio.Redis.from_pool(pool)
