import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tiergate.policies.routing import BudgetState
from tiergate.policies.spec import BudgetSpec
from tiergate.workers.budget import (
    BudgetLedger,
    LocalBudgetLedger,
    RedisBudgetLedger,
    Reservation,
    open_budget_ledger,
)
from tiergate.workers.errors import CoordinationError
from tiergate.workers.settings import Settings

# 2024-03-01 12:00:30 UTC: half a minute into a minute, far from midnight.
NOON = datetime(2024, 3, 1, 12, 0, 30, tzinfo=UTC).timestamp()


class Clock:
    """A settable clock in epoch seconds."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    """A clock fixed at noon, moved by the tests that need time to pass."""
    return Clock(NOON)


@pytest.fixture(params=["redis", "local"])
def ledger(request, redis_prefix, clock) -> Iterator[BudgetLedger]:
    """Each ledger, reading the test's clock."""
    if request.param == "local":
        yield LocalBudgetLedger(clock=clock)
        return
    client = redis.Redis(host="127.0.0.1", port=6379)
    yield RedisBudgetLedger(client, prefix=redis_prefix, clock=clock)
    client.close()


def test_reserve_within_limits_charges_both_windows(ledger):
    """A reservation within the limits is granted and shows in state()."""
    spec = BudgetSpec(calls_per_minute=3, usd_per_day=1.0)
    assert ledger.state("p", spec) == BudgetState(calls_left=3, usd_left=1.0)
    reservation = ledger.reserve("p", spec, 0.25)
    assert reservation == Reservation("p", 0.25, int(NOON // 60), "2024-03-01")
    assert ledger.state("p", spec) == BudgetState(calls_left=2, usd_left=0.75)


def test_policies_have_separate_budgets(ledger):
    """Spending one policy's budget leaves another's untouched."""
    spec = BudgetSpec(calls_per_minute=1, usd_per_day=1.0)
    assert ledger.reserve("a", spec, 1.0) is not None
    assert ledger.reserve("a", spec, 0.0) is None
    assert ledger.reserve("b", spec, 1.0) is not None


def test_calls_per_minute_refuses_the_next_call_until_the_next_minute(ledger, clock):
    """The (limit+1)th call in a minute is refused, charging nothing; the next minute allows."""
    spec = BudgetSpec(calls_per_minute=3, usd_per_day=10.0)
    for _ in range(3):
        assert ledger.reserve("p", spec, 0.1) is not None
    assert ledger.reserve("p", spec, 0.1) is None
    state = ledger.state("p", spec)
    assert state.calls_left == 0
    assert state.exhausted
    assert state.usd_left == pytest.approx(9.7)  # the refused call charged no money
    clock.now += 29  # 12:00:59, still the same minute
    assert ledger.reserve("p", spec, 0.1) is None
    clock.now += 1  # 12:01:00
    assert ledger.state("p", spec).calls_left == 3
    assert ledger.reserve("p", spec, 0.1) is not None


def test_money_refuses_an_estimate_larger_than_what_is_left(ledger):
    """An estimate above the money left is refused; one that fits exactly is granted."""
    spec = BudgetSpec(usd_per_day=1.0)
    assert ledger.reserve("p", spec, 0.6) is not None
    assert ledger.reserve("p", spec, 0.5) is None
    assert ledger.state("p", spec).usd_left == pytest.approx(0.4)
    assert ledger.reserve("p", spec, 0.4) is not None
    assert ledger.state("p", spec) == BudgetState(calls_left=None, usd_left=0.0)
    assert ledger.reserve("p", spec, 0.0) is None  # nothing left: even a free call is refused


def test_zero_dollar_budget_refuses_every_call(ledger):
    """usd_per_day of 0 turns the LLM off for the policy."""
    assert ledger.reserve("p", BudgetSpec(usd_per_day=0.0), 0.0) is None


def test_settle_adjusts_the_spend_by_the_difference(ledger):
    """Settling moves the day's spend from the estimate to the actual cost."""
    spec = BudgetSpec(usd_per_day=1.0)
    cheap = ledger.reserve("p", spec, 0.5)
    assert cheap is not None
    ledger.settle(cheap, 0.2)
    assert ledger.state("p", spec).usd_left == pytest.approx(0.8)
    failed = ledger.reserve("p", spec, 0.3)
    assert failed is not None
    ledger.settle(failed, 0.0)  # a failed call with no usage gives its estimate back
    assert ledger.state("p", spec).usd_left == pytest.approx(0.8)


def test_settle_above_the_estimate_can_overspend_and_then_refuses(ledger):
    """A settle above the estimate may pass the limit; then nothing more is granted."""
    spec = BudgetSpec(usd_per_day=1.0)
    reservation = ledger.reserve("p", spec, 0.9)
    assert reservation is not None
    ledger.settle(reservation, 1.3)
    assert ledger.state("p", spec).usd_left == 0.0
    assert ledger.reserve("p", spec, 0.0) is None


def test_a_failed_call_still_counts_against_calls_per_minute(ledger):
    """Settling with 0 refunds the money but not the call."""
    spec = BudgetSpec(calls_per_minute=1)
    reservation = ledger.reserve("p", spec, 0.1)
    assert reservation is not None
    ledger.settle(reservation, 0.0)
    assert ledger.reserve("p", spec, 0.1) is None


def test_settle_after_midnight_adjusts_the_reserved_day(ledger, clock):
    """A reservation made before midnight is settled against that day, not the new one."""
    spec = BudgetSpec(usd_per_day=1.0)
    clock.now = datetime(2024, 3, 1, 23, 59, 59, tzinfo=UTC).timestamp()
    reservation = ledger.reserve("p", spec, 0.5)
    assert reservation is not None
    assert reservation.day == "2024-03-01"
    clock.now += 2
    ledger.settle(reservation, 0.1)
    assert ledger.state("p", spec).usd_left == 1.0  # the new day is untouched
    clock.now -= 2
    assert ledger.state("p", spec).usd_left == pytest.approx(0.9)


def test_unlimited_spec_always_grants(ledger):
    """A spec without limits grants every reservation and reports no limits."""
    spec = BudgetSpec()
    assert all(ledger.reserve("p", spec, 5.0) is not None for _ in range(100))
    assert ledger.state("p", spec) == BudgetState(calls_left=None, usd_left=None)


def test_negative_amounts_are_refused(ledger):
    """A negative estimate or actual cost is a caller bug and raises ValueError."""
    spec = BudgetSpec(usd_per_day=1.0)
    with pytest.raises(ValueError, match="usd"):
        ledger.reserve("p", spec, -0.1)
    reservation = ledger.reserve("p", spec, 0.1)
    assert reservation is not None
    with pytest.raises(ValueError, match="actual_usd"):
        ledger.settle(reservation, float("nan"))


def test_redis_counters_expire(redis_prefix, clock):
    """The minute counter expires within two minutes and the day's spend within two days."""
    client = redis.Redis(host="127.0.0.1", port=6379)
    ledger = RedisBudgetLedger(client, prefix=redis_prefix, clock=clock)
    reservation = ledger.reserve("p", BudgetSpec(calls_per_minute=5, usd_per_day=1.0), 0.25)
    assert reservation is not None
    calls_key = f"{redis_prefix}:budget:p:calls:{reservation.minute}"
    usd_key = f"{redis_prefix}:budget:p:usd:2024-03-01"
    assert client.get(calls_key) == b"1"
    assert client.get(usd_key) == b"250000"  # integer micro-dollars
    assert 60 < client.ttl(calls_key) <= 120
    assert 24 * 3600 < client.ttl(usd_key) <= 2 * 24 * 3600
    client.close()


@pytest.mark.parametrize(
    ("spec", "usd", "limit"),
    [
        (BudgetSpec(calls_per_minute=50, usd_per_day=100.0), 0.01, 50),
        (BudgetSpec(usd_per_day=1.0), 0.03, 33),
    ],
    ids=["calls-bind", "money-binds"],
)
def test_concurrent_threads_never_exceed_the_limits(ledger, spec, usd, limit):
    """16 threads x 20 reservations: exactly the limit is granted, and no more money."""
    start = threading.Barrier(16)

    def reserve_many() -> list[Reservation]:
        start.wait()
        return [r for _ in range(20) if (r := ledger.reserve("p", spec, usd)) is not None]

    with ThreadPoolExecutor(max_workers=16) as pool:
        granted = [r for batch in pool.map(lambda _: reserve_many(), range(16)) for r in batch]
    assert len(granted) == limit
    assert sum(r.usd for r in granted) <= spec.usd_per_day + 1e-9
    left = ledger.state("p", spec)
    assert left.usd_left == pytest.approx(spec.usd_per_day - limit * usd)


RESERVER = textwrap.dedent(
    """
    import os, sys, threading, time
    import redis
    from tiergate.policies.spec import BudgetSpec
    from tiergate.workers.budget import RedisBudgetLedger

    prefix, now, calls, usd_per_day, usd, go = sys.argv[1:]
    spec = BudgetSpec(
        calls_per_minute=int(calls) if calls != "-" else None, usd_per_day=float(usd_per_day)
    )
    ledger = RedisBudgetLedger(redis.Redis(host="127.0.0.1", port=6379), prefix, lambda: float(now))
    granted = []

    def reserve_many():
        for _ in range(20):
            if ledger.reserve("p", spec, float(usd)) is not None:
                granted.append(float(usd))

    threads = [threading.Thread(target=reserve_many) for _ in range(4)]
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.002)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(len(granted), sum(granted), flush=True)
    """
)


@pytest.mark.parametrize(
    ("calls", "usd", "limit"), [("30", 0.01, 30), ("-", 0.07, 14)], ids=["calls", "money"]
)
def test_concurrent_processes_never_exceed_the_limits(redis_prefix, tmp_path, calls, usd, limit):
    """4 processes x 4 threads x 20 reservations on Redis: exactly the limit is granted."""
    go = tmp_path / "go"
    args = [redis_prefix, str(NOON), calls, "1.0", str(usd), str(go)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", RESERVER, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        for process in processes:
            assert process.stdout is not None
            assert process.stdout.readline() == "ready\n"
        go.touch()
        outputs = [process.communicate(timeout=30) for process in processes]
    finally:
        for process in processes:
            process.kill()
            process.wait()
    assert all(process.returncode == 0 for process in processes), [err for _, err in outputs]
    counts = [out.split() for out, _ in outputs]
    assert sum(int(count) for count, _ in counts) == limit
    assert sum(float(money) for _, money in counts) <= 1.0 + 1e-9
    client = redis.Redis(host="127.0.0.1", port=6379)
    ledger = RedisBudgetLedger(client, redis_prefix, Clock(NOON))
    left = ledger.state("p", BudgetSpec(usd_per_day=1.0)).usd_left
    client.close()
    assert left == pytest.approx(1.0 - limit * usd)


@pytest.fixture
def unreachable_ledger() -> Iterator[RedisBudgetLedger]:
    """A Redis ledger pointed at a closed port, failing fast (no retries)."""
    client = redis.Redis(
        host="127.0.0.1", port=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
    )
    yield RedisBudgetLedger(client, prefix="unused")
    client.close()


@pytest.mark.parametrize(
    "operation",
    [
        lambda ledger: ledger.state("p", BudgetSpec(usd_per_day=1.0)),
        lambda ledger: ledger.reserve("p", BudgetSpec(usd_per_day=1.0), 0.1),
        lambda ledger: ledger.settle(Reservation("p", 0.1, 1, "2024-03-01"), 0.2),
    ],
    ids=["state", "reserve", "settle"],
)
def test_redis_down_raises_coordination_error(unreachable_ledger, operation):
    """Every ledger operation against a closed port raises CoordinationError naming Redis."""
    with pytest.raises(CoordinationError, match=r"Redis at 127\.0\.0\.1:1 is unreachable"):
        operation(unreachable_ledger)


def test_open_budget_ledger_follows_the_settings(redis_prefix, tmp_path):
    """open_budget_ledger gives a Redis ledger under the prefix with redis_url, else a local one."""
    shared = open_budget_ledger(
        Settings(redis_url="redis://127.0.0.1:6379/0", cache_prefix=redis_prefix, data_dir=tmp_path)
    )
    assert isinstance(shared, RedisBudgetLedger)
    assert shared.reserve("p", BudgetSpec(usd_per_day=1.0), 0.5) is not None
    client = redis.Redis(host="127.0.0.1", port=6379)
    assert list(client.scan_iter(match=f"{redis_prefix}:budget:p:usd:*")) != []
    client.close()
    assert isinstance(open_budget_ledger(Settings(data_dir=tmp_path)), LocalBudgetLedger)
