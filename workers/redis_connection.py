"""The one Redis client of a process, and what its failures mean to tiergate.

Every Redis store of a process (the decision cache and single-flight, budgets, the circuit
breakers' shared state, the decision ledger, the served policies) talks through
:func:`shared_redis`: one client, so one connection pool, per Redis URL. redis-py's pool
notices a fork and opens fresh connections in the child, so a prefork worker may inherit it.
Readiness probes use :func:`probe_redis` instead, whose short timeouts make a probe of an
unreachable Redis fail fast rather than hang like a store's call would.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from tiergate.workers.errors import CoordinationError

_clients: dict[tuple[str, float | None], redis.Redis] = {}
_lock = threading.Lock()


def shared_redis(url: str) -> redis.Redis:
    """This process's client for the Redis at ``url``, created on first use."""
    return _client(url, None)


def probe_redis(url: str, timeout_s: float) -> redis.Redis:
    """A client for health probes of ``url``: it gives up after ``timeout_s``."""
    return _client(url, timeout_s)


def _client(url: str, timeout_s: float | None) -> redis.Redis:
    with _lock:
        client = _clients.get((url, timeout_s))
        if client is None:
            client = redis.Redis.from_url(
                url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
            )
            _clients[(url, timeout_s)] = client
        return client


def describe_redis(client: redis.Redis) -> str:
    """Where ``client`` connects, for messages: ``Redis at host:port``."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"Redis at unix:{kwargs['path']}"
    return f"Redis at {kwargs.get('host', '?')}:{kwargs.get('port', '?')}"


@contextmanager
def redis_errors_as_coordination_errors(client: redis.Redis, doing: str) -> Iterator[None]:
    """Turn Redis connection failures and timeouts into :class:`CoordinationError`.

    ``doing`` says what was being done (``"reading the decision cache"``), so the message reads
    "<doing>: Redis at host:port is unreachable or timed out (<detail>)". Other Redis errors
    (a bad script, a wrong type) are bugs and propagate unchanged.
    """
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise CoordinationError(
            f"{doing}: {describe_redis(client)} is unreachable or timed out ({exc})"
        ) from exc
