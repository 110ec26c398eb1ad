"""LLM budgets per policy: calls per minute and US dollars per day.

A worker reserves before it calls the LLM and settles with the real cost afterwards::

    reservation = ledger.reserve(spec.name, spec.budget, usd=estimated_cost)
    if reservation is None:
        ...  # budget spent: the policy's when_exhausted applies
    try:
        result = tier.answer(request)
    except LLMError as exc:
        # A failed answer is paid for what its calls cost (no call, or no answer: nothing);
        # the call still counts against the minute.
        ledger.settle(reservation, exc.usage.cost_usd if exc.usage is not None else 0.0)
        raise
    ledger.settle(reservation, result.usage.cost_usd)

Reserving checks both limits and charges both counters in one atomic step, so concurrent
workers can never be granted more than the limits between them. Calls per minute count
reservations made (a call that failed still counts: it still hit the provider's rate limit);
only money is settled. A reservation is refused when the money left today is spent or smaller
than its estimate, so the money reserved never exceeds ``usd_per_day``; the money *spent* may
exceed it by the settle differences (actual minus estimate) of reservations already granted,
since the real cost is only known after the call.

Minutes are UTC epoch minutes and days are UTC calendar days, both read from the same clock
reading at reservation time; a reservation records them so settling adjusts the same day.
Money is counted in integer micro-dollars so concurrent increments never lose precision.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import redis

from tiergate.policies.routing import BudgetState
from tiergate.policies.spec import BudgetSpec
from tiergate.workers.redis_connection import redis_errors_as_coordination_errors, shared_redis
from tiergate.workers.settings import Settings

Clock = Callable[[], float]

_MICROS_PER_USD = 1_000_000

# A minute's call counter lives a little past its minute; a day's spend a day past its day (so
# a late settle still finds it).
_CALLS_TTL_S = 120
_USD_TTL_S = 2 * 24 * 3600


def _micros(usd: float) -> int:
    return round(usd * _MICROS_PER_USD)


def _windows(now: float) -> tuple[int, str]:
    """The epoch minute and the UTC day (``YYYY-MM-DD``) that ``now`` falls in."""
    return int(now // 60), datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")


def _check_usd(name: str, usd: float) -> None:
    if not usd >= 0:  # also refuses NaN
        raise ValueError(f"{name} must be a non-negative number of dollars, not {usd}")


def _allows(spec: BudgetSpec, calls: int, spent_micros: int, usd_micros: int) -> bool:
    """Whether one more call costing ``usd_micros`` fits under ``spec``'s limits."""
    if spec.calls_per_minute is not None and calls >= spec.calls_per_minute:
        return False
    if spec.usd_per_day is None:
        return True
    limit = _micros(spec.usd_per_day)
    return spent_micros < limit and spent_micros + usd_micros <= limit


def _state(spec: BudgetSpec, calls: int, spent_micros: int) -> BudgetState:
    calls_left = None
    if spec.calls_per_minute is not None:
        calls_left = max(0, spec.calls_per_minute - calls)
    usd_left = None
    if spec.usd_per_day is not None:
        usd_left = max(0, _micros(spec.usd_per_day) - spent_micros) / _MICROS_PER_USD
    return BudgetState(calls_left=calls_left, usd_left=usd_left)


@dataclass(frozen=True)
class Reservation:
    """A granted LLM call: one call charged to ``minute`` and ``usd`` charged to ``day``.

    ``minute`` is the UTC epoch minute and ``day`` the UTC date (``YYYY-MM-DD``) that were
    charged, so :meth:`BudgetLedger.settle` adjusts the same day even after midnight.
    """

    policy: str
    usd: float
    minute: int
    day: str


class BudgetLedger(Protocol):
    """Per-policy LLM budgets, shared by every worker that uses the same ledger.

    Methods may raise :class:`~tiergate.workers.errors.CoordinationError` when the store behind the
    ledger fails.
    """

    def state(self, policy: str, spec: BudgetSpec) -> BudgetState:
        """What is left of ``policy``'s budget now: calls this minute, dollars today.

        ``None`` for a limit the spec does not set. Never negative.
        """
        ...

    def reserve(self, policy: str, spec: BudgetSpec, usd: float) -> Reservation | None:
        """Charge one call and ``usd`` (the estimated cost) to ``policy``, atomically.

        Returns ``None``, charging nothing, when this minute's calls are used up, or when
        today's money is spent or smaller than ``usd``. A spec with no limits always grants
        (the call and money are still recorded, so a limit added later sees today's spend).
        """
        ...

    def settle(self, reservation: Reservation, actual_usd: float) -> None:
        """Correct the reserved day's spend by ``actual_usd - reservation.usd``.

        A failed call settles with what it cost (an invalid answer's tokens are paid; a call
        that got no answer settles with 0, which gives the estimate back). The call itself
        stays counted. Settle each reservation once.
        """
        ...


# KEYS: calls counter, micro-dollar counter. ARGV: calls limit (-1: none), micro-dollar limit
# (-1: none), micro-dollars to reserve, calls counter TTL, money counter TTL.
# Checks both limits and charges both counters, or charges nothing: one script, so atomic.
_RESERVE = """
local calls = tonumber(redis.call('GET', KEYS[1]) or '0')
local spent = tonumber(redis.call('GET', KEYS[2]) or '0')
local calls_limit = tonumber(ARGV[1])
local usd_limit = tonumber(ARGV[2])
local usd = tonumber(ARGV[3])
if calls_limit >= 0 and calls >= calls_limit then return 0 end
if usd_limit >= 0 and (spent >= usd_limit or spent + usd > usd_limit) then return 0 end
redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('INCRBY', KEYS[2], usd)
redis.call('EXPIRE', KEYS[2], ARGV[5])
return 1
"""


class RedisBudgetLedger:
    """Budgets in Redis, shared by every worker process on every machine.

    Keys: ``{prefix}:budget:{policy}:calls:{minute}`` (calls reserved in that epoch minute,
    expiring after two minutes) and ``{prefix}:budget:{policy}:usd:{YYYY-MM-DD}`` (micro-dollars
    reserved or settled that UTC day, expiring after two days). ``clock`` gives the time in
    epoch seconds (injectable for tests). Connection failures and timeouts raise
    :class:`~tiergate.workers.errors.CoordinationError`.
    """

    def __init__(
        self, client: redis.Redis, prefix: str = "tiergate", clock: Clock = time.time
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._clock = clock
        self._reserve = client.register_script(_RESERVE)

    def _calls_key(self, policy: str, minute: int) -> str:
        return f"{self._prefix}:budget:{policy}:calls:{minute}"

    def _usd_key(self, policy: str, day: str) -> str:
        return f"{self._prefix}:budget:{policy}:usd:{day}"

    def state(self, policy: str, spec: BudgetSpec) -> BudgetState:
        """See :meth:`BudgetLedger.state` (one ``MGET``)."""
        minute, day = _windows(self._clock())
        keys = [self._calls_key(policy, minute), self._usd_key(policy, day)]
        with redis_errors_as_coordination_errors(self._client, "reading an LLM budget"):
            calls, spent = self._client.mget(keys)
        return _state(spec, int(calls or 0), int(spent or 0))

    def reserve(self, policy: str, spec: BudgetSpec, usd: float) -> Reservation | None:
        """See :meth:`BudgetLedger.reserve` (one script call)."""
        _check_usd("usd", usd)
        minute, day = _windows(self._clock())
        calls_limit = -1 if spec.calls_per_minute is None else spec.calls_per_minute
        usd_limit = -1 if spec.usd_per_day is None else _micros(spec.usd_per_day)
        with redis_errors_as_coordination_errors(self._client, "reserving an LLM budget"):
            granted = self._reserve(
                keys=[self._calls_key(policy, minute), self._usd_key(policy, day)],
                args=[calls_limit, usd_limit, _micros(usd), _CALLS_TTL_S, _USD_TTL_S],
            )
        return Reservation(policy, usd, minute, day) if granted == 1 else None

    def settle(self, reservation: Reservation, actual_usd: float) -> None:
        """See :meth:`BudgetLedger.settle` (``INCRBY`` of the difference on the reserved day)."""
        _check_usd("actual_usd", actual_usd)
        difference = _micros(actual_usd) - _micros(reservation.usd)
        if difference == 0:
            return
        key = self._usd_key(reservation.policy, reservation.day)
        with redis_errors_as_coordination_errors(self._client, "settling an LLM budget"):
            pipeline = self._client.pipeline(transaction=True)
            pipeline.incrby(key, difference)
            pipeline.expire(key, _USD_TTL_S)
            pipeline.execute()


class LocalBudgetLedger:
    """Budgets in this process only, for running without Redis; thread-safe.

    Same semantics as :class:`RedisBudgetLedger`, with each check-and-charge under one lock.
    Windows older than the ones the Redis keys would keep are forgotten as time moves on.
    """

    def __init__(self, clock: Clock = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._calls: dict[tuple[str, int], int] = {}
        self._spent: dict[tuple[str, str], int] = {}

    def _forget_old_windows(self, minute: int, now: float) -> None:
        oldest_day = _windows(now - _USD_TTL_S)[1]
        for calls_key in [key for key in self._calls if key[1] < minute - 1]:
            del self._calls[calls_key]
        for spent_key in [key for key in self._spent if key[1] < oldest_day]:
            del self._spent[spent_key]

    def state(self, policy: str, spec: BudgetSpec) -> BudgetState:
        """See :meth:`BudgetLedger.state`."""
        minute, day = _windows(self._clock())
        with self._lock:
            calls = self._calls.get((policy, minute), 0)
            spent = self._spent.get((policy, day), 0)
        return _state(spec, calls, spent)

    def reserve(self, policy: str, spec: BudgetSpec, usd: float) -> Reservation | None:
        """See :meth:`BudgetLedger.reserve`."""
        _check_usd("usd", usd)
        now = self._clock()
        minute, day = _windows(now)
        usd_micros = _micros(usd)
        with self._lock:
            self._forget_old_windows(minute, now)
            calls = self._calls.get((policy, minute), 0)
            spent = self._spent.get((policy, day), 0)
            if not _allows(spec, calls, spent, usd_micros):
                return None
            self._calls[policy, minute] = calls + 1
            self._spent[policy, day] = spent + usd_micros
        return Reservation(policy, usd, minute, day)

    def settle(self, reservation: Reservation, actual_usd: float) -> None:
        """See :meth:`BudgetLedger.settle`."""
        _check_usd("actual_usd", actual_usd)
        difference = _micros(actual_usd) - _micros(reservation.usd)
        key = (reservation.policy, reservation.day)
        with self._lock:
            self._spent[key] = self._spent.get(key, 0) + difference


def open_budget_ledger(settings: Settings) -> BudgetLedger:
    """The budget ledger that ``settings`` ask for.

    Redis at ``settings.redis_url`` (keys under ``settings.cache_prefix``) when it is set, so
    every worker shares the budgets; else a ledger local to this process.
    """
    if settings.redis_url:
        return RedisBudgetLedger(shared_redis(settings.redis_url), settings.cache_prefix)
    return LocalBudgetLedger()
