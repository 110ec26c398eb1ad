"""A circuit breaker per (provider, model), with its state in a store that workers share.

Closed: calls go through, and consecutive transient failures are counted. After
``failures`` of them the breaker opens: no calls for ``reset_s`` seconds. Then it is
half-open: exactly one caller gets ``allow() == True`` (the probe) while everyone else still
sees it open; the probe's success closes the breaker, its failure opens it again for another
``reset_s``. A probe that never reports back (its worker died) is replaced by a new one after
another ``reset_s``.

The state machine is written once, in :class:`CircuitBreaker`, as pure transitions of a
:class:`BreakerRecord`. A :class:`BreakerStore` applies a transition atomically: in process
under a lock (:class:`LocalBreakerStore`), across processes with Redis optimistic
transactions (``WATCH``/``MULTI``, :class:`RedisBreakerStore`). Records expire, so a breaker
nobody uses leaves nothing behind. Times come from each worker's clock, so workers sharing a
breaker should have synchronised clocks (NTP is plenty at breaker time scales).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal, Protocol, TypeVar

import redis
from redis.typing import EncodableT, FieldT

from tiergate.workers.errors import CoordinationError

BreakerState = Literal["closed", "open", "half_open"]
T = TypeVar("T")


@dataclass(frozen=True)
class BreakerRecord:
    """The shared state of one breaker.

    ``failures`` counts consecutive transient failures; ``opened_at`` is when the breaker
    last opened (``None`` while closed); ``probe_until`` is when the current half-open probe's
    lease runs out (``None`` when no probe is out). The default record is a closed breaker.
    """

    failures: int = 0
    opened_at: float | None = None
    probe_until: float | None = None


CLOSED = BreakerRecord()

Transition = Callable[[BreakerRecord], tuple[BreakerRecord, T]]


class BreakerStore(Protocol):
    """Where breaker records live; shared by every :class:`CircuitBreaker` that uses it.

    ``update(key, transition, ttl_s)`` reads the record of ``key`` (:data:`CLOSED` when there
    is none), computes ``transition(record) -> (new_record, result)``, stores ``new_record``
    (deleting the key when it is :data:`CLOSED`, otherwise keeping it ``ttl_s`` seconds after
    this write; nothing is written when the record is unchanged) and returns ``result``,
    atomically with respect to every other update of the same key. ``read(key)`` returns the
    current record. Both may raise :class:`~tiergate.workers.errors.CoordinationError` when the
    store is unreachable.
    """

    def read(self, key: str) -> BreakerRecord:
        """The current record of ``key``."""
        ...

    def update(self, key: str, transition: Transition[T], ttl_s: float) -> T:
        """Apply ``transition`` to the record of ``key`` atomically; see the class docstring."""
        ...


class LocalBreakerStore:
    """Breaker records in this process's memory, guarded by one lock.

    For embedded mode and single-process deployments: each process has its own breakers.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._records: dict[str, tuple[BreakerRecord, float]] = {}

    def read(self, key: str) -> BreakerRecord:
        """The current record of ``key``."""
        with self._lock:
            return self._current(key)

    def update(self, key: str, transition: Transition[T], ttl_s: float) -> T:
        """Apply ``transition`` to the record of ``key`` under the lock."""
        with self._lock:
            current = self._current(key)
            record, result = transition(current)
            if record == current:
                return result
            if record == CLOSED:
                self._records.pop(key, None)
            else:
                self._records[key] = (record, self._clock() + ttl_s)
            return result

    def _current(self, key: str) -> BreakerRecord:
        entry = self._records.get(key)
        if entry is None:
            return CLOSED
        record, expires = entry
        if self._clock() >= expires:
            del self._records[key]
            return CLOSED
        return record


class RedisBreakerStore:
    """Breaker records in Redis hashes under ``{prefix}:breaker:{key}``, shared by processes.

    Updates are optimistic transactions: ``WATCH`` the key, read it, compute the transition,
    write it in ``MULTI``/``EXEC``; when another process wrote in between, Redis aborts the
    transaction and the update is retried on the new record. Each write sets the key's TTL.
    Redis failures raise :class:`~tiergate.workers.errors.CoordinationError`.
    """

    _FIELDS = ("failures", "opened_at", "probe_until")

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self._redis = client
        self._prefix = prefix

    def name(self, key: str) -> str:
        """The Redis key that holds the record of breaker ``key``."""
        return f"{self._prefix}:breaker:{key}"

    def read(self, key: str) -> BreakerRecord:
        """The current record of ``key``."""
        try:
            raw = self._redis.hgetall(self.name(key))
        except redis.RedisError as exc:
            raise CoordinationError(f"breaker store: {exc}") from exc
        return self._decode(raw)

    def update(self, key: str, transition: Transition[T], ttl_s: float) -> T:
        """Apply ``transition`` to the record of ``key`` in a ``WATCH``/``MULTI`` transaction."""
        name = self.name(key)
        try:
            with self._redis.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        pipe.watch(name)  # type: ignore[no-untyped-call]  # untyped in redis-py
                        raw = pipe.hgetall(name)
                        current = self._decode(raw)
                        record, result = transition(current)
                        if record == current:
                            pipe.unwatch()
                            return result
                        pipe.multi()
                        pipe.delete(name)
                        if record != CLOSED:
                            pipe.hset(name, mapping=self._encode(record))
                            pipe.expire(name, max(1, math.ceil(ttl_s)))
                        pipe.execute()
                    except redis.WatchError:
                        continue  # another process changed the record: decide again on it
                    return result
        except redis.RedisError as exc:
            raise CoordinationError(f"breaker store: {exc}") from exc

    @classmethod
    def _decode(cls, raw: dict[bytes | str, bytes | str]) -> BreakerRecord:
        values = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()
        }
        opened_at = values.get("opened_at")
        probe_until = values.get("probe_until")
        return BreakerRecord(
            failures=int(values.get("failures", "0")),
            opened_at=float(opened_at) if opened_at is not None else None,
            probe_until=float(probe_until) if probe_until is not None else None,
        )

    @classmethod
    def _encode(cls, record: BreakerRecord) -> dict[FieldT, EncodableT]:
        encoded: dict[FieldT, EncodableT] = {"failures": str(record.failures)}
        if record.opened_at is not None:
            encoded["opened_at"] = repr(record.opened_at)
        if record.probe_until is not None:
            encoded["probe_until"] = repr(record.probe_until)
        return encoded


class CircuitBreaker:
    """The breaker state machine (see the module docstring) over a shared store.

    ``key`` names one breaker, conventionally ``"{provider}:{model}"``. ``allow(key)`` says
    whether a call may go out now (and in half-open state hands out the single probe);
    ``would_allow(key)`` asks the same without taking the probe or writing anything;
    report the outcome of every allowed call with ``record_success`` or ``record_failure``
    (only transient failures count: a provider that answered, even with an error of ours,
    is up). ``clock`` gives seconds as a float; it must agree across workers that share a
    store (the default, ``time.time``, does).
    """

    def __init__(
        self,
        store: BreakerStore,
        failures: int,
        reset_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if failures < 1 or reset_s <= 0:
            raise ValueError("a breaker needs failures >= 1 and reset_s > 0")
        self._store = store
        self._failures = failures
        self._reset_s = reset_s
        self._clock = clock
        # An open record must outlive its open period and one probe lease; a closed record
        # with a few failures may expire sooner, which only forgets stale failures.
        self._ttl_s = 2 * reset_s + 60.0

    def allow(self, key: str) -> bool:
        """Whether a call to ``key`` may go out now; see the class docstring."""
        if self._store.read(key).opened_at is None:
            return True  # the common case needs one read and no transaction
        now = self._clock()

        def transition(record: BreakerRecord) -> tuple[BreakerRecord, bool]:
            if not self._admits(record, now):
                return record, False
            if record.opened_at is None:
                return record, True
            return replace(record, probe_until=now + self._reset_s), True  # take the probe

        return self._store.update(key, transition, self._ttl_s)

    def would_allow(self, key: str) -> bool:
        """Whether :meth:`allow` would let a call to ``key`` go out now; a read, changing nothing.

        In half-open state it answers ``True`` while the probe is still free, without taking it,
        so a caller may check before doing work and then ask :meth:`allow` for the call itself.
        The answer can be stale by then (another caller may take the probe first).
        """
        return self._admits(self._store.read(key), self._clock())

    def _admits(self, record: BreakerRecord, now: float) -> bool:
        """Whether ``record`` lets a call through at ``now``: closed, or half-open, probe free."""
        if record.opened_at is None:
            return True
        if now < record.opened_at + self._reset_s:
            return False
        return record.probe_until is None or now >= record.probe_until  # else a probe is out

    def record_success(self, key: str) -> None:
        """A call to ``key`` succeeded: the breaker closes and its failure count resets."""
        if self._store.read(key) != CLOSED:
            self._store.update(key, lambda _record: (CLOSED, None), self._ttl_s)

    def record_failure(self, key: str) -> None:
        """A call to ``key`` failed transiently: count it, and open (or re-open) the breaker."""
        now = self._clock()

        def transition(record: BreakerRecord) -> tuple[BreakerRecord, None]:
            failures = record.failures + 1
            if record.opened_at is None:
                opened_at = now if failures >= self._failures else None
                return BreakerRecord(failures=failures, opened_at=opened_at), None
            if now >= record.opened_at + self._reset_s:
                # Half-open: the probe (or a straggler) failed, so wait a full period again.
                return BreakerRecord(failures=failures, opened_at=now), None
            return replace(record, failures=failures), None

        self._store.update(key, transition, self._ttl_s)

    def state(self, key: str) -> BreakerState:
        """``closed``, ``open``, or ``half_open`` (the open period is over; a probe may go)."""
        record = self._store.read(key)
        if record.opened_at is None:
            return "closed"
        if self._clock() < record.opened_at + self._reset_s:
            return "open"
        return "half_open"
