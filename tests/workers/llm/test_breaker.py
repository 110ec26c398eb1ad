import threading

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tiergate.workers.errors import CoordinationError
from tiergate.workers.llm.breaker import CircuitBreaker, LocalBreakerStore, RedisBreakerStore

KEY = "openai:gpt-4o-mini"


class Clock:
    """A settable clock shared by the breakers of one test (seconds as a float)."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["local", "redis"])
def store(request, redis_store):
    """Each breaker test runs against the in-process store and against real Redis."""
    if request.param == "local":
        return LocalBreakerStore()
    client, prefix = redis_store
    return RedisBreakerStore(client, prefix)


def open_breaker(breaker: CircuitBreaker, failures: int = 3) -> None:
    """Report enough consecutive failures to open ``breaker``."""
    for _ in range(failures):
        assert breaker.allow(KEY)
        breaker.record_failure(KEY)


def test_a_new_breaker_is_closed_and_allows_calls(store):
    """With no history a breaker is closed and lets calls through."""
    breaker = CircuitBreaker(store, failures=3, reset_s=10, clock=Clock())
    assert breaker.state(KEY) == "closed"
    assert breaker.allow(KEY)


def test_it_opens_after_the_configured_consecutive_failures(store):
    """Failures below the threshold keep it closed; reaching it opens the breaker."""
    breaker = CircuitBreaker(store, failures=3, reset_s=10, clock=Clock())
    breaker.record_failure(KEY)
    breaker.record_failure(KEY)
    assert breaker.state(KEY) == "closed"
    breaker.record_failure(KEY)
    assert breaker.state(KEY) == "open"
    assert not breaker.allow(KEY)


def test_a_success_resets_the_failure_count(store):
    """Failures must be consecutive: a success in between starts the count again."""
    breaker = CircuitBreaker(store, failures=3, reset_s=10, clock=Clock())
    breaker.record_failure(KEY)
    breaker.record_failure(KEY)
    breaker.record_success(KEY)
    breaker.record_failure(KEY)
    breaker.record_failure(KEY)
    assert breaker.state(KEY) == "closed"


def test_after_the_reset_time_exactly_one_probe_goes_through(store):
    """Once reset_s has passed the breaker is half-open and hands out a single probe."""
    clock = Clock()
    breaker = CircuitBreaker(store, failures=3, reset_s=10, clock=clock)
    open_breaker(breaker)
    clock.now += 9.9
    assert not breaker.allow(KEY)
    clock.now += 0.2
    assert breaker.state(KEY) == "half_open"
    assert breaker.allow(KEY)
    assert not breaker.allow(KEY)
    assert breaker.state(KEY) == "half_open"


def test_would_allow_answers_like_allow_without_taking_the_probe(store):
    """would_allow is a read: open says no, half-open says yes until allow takes the probe."""
    clock = Clock()
    breaker = CircuitBreaker(store, failures=3, reset_s=10, clock=clock)
    assert breaker.would_allow(KEY)
    open_breaker(breaker)
    assert not breaker.would_allow(KEY)
    clock.now += 10
    assert breaker.would_allow(KEY)
    assert breaker.would_allow(KEY)
    assert breaker.allow(KEY)
    assert not breaker.would_allow(KEY)
    assert not breaker.allow(KEY)


def test_a_successful_probe_closes_the_breaker(store):
    """The probe's success closes the breaker for everyone."""
    clock = Clock()
    breaker = CircuitBreaker(store, failures=3, reset_s=10, clock=clock)
    open_breaker(breaker)
    clock.now += 10
    assert breaker.allow(KEY)
    breaker.record_success(KEY)
    assert breaker.state(KEY) == "closed"
    assert breaker.allow(KEY)
    assert breaker.allow(KEY)


def test_a_failed_probe_reopens_the_breaker_for_a_full_period(store):
    """The probe's failure opens the breaker again, counted from the failure."""
    clock = Clock()
    breaker = CircuitBreaker(store, failures=3, reset_s=10, clock=clock)
    open_breaker(breaker)
    clock.now += 15
    assert breaker.allow(KEY)
    breaker.record_failure(KEY)
    assert breaker.state(KEY) == "open"
    clock.now += 9
    assert not breaker.allow(KEY)
    clock.now += 1
    assert breaker.allow(KEY)


def test_a_lost_probe_is_replaced_after_another_period(store):
    """A probe that never reports back does not keep the breaker shut forever."""
    clock = Clock()
    breaker = CircuitBreaker(store, failures=3, reset_s=10, clock=clock)
    open_breaker(breaker)
    clock.now += 10
    assert breaker.allow(KEY)
    clock.now += 5
    assert not breaker.allow(KEY)
    clock.now += 5
    assert breaker.allow(KEY)


def test_breakers_are_independent_per_key(store):
    """Opening one provider's breaker leaves another's closed."""
    breaker = CircuitBreaker(store, failures=1, reset_s=10, clock=Clock())
    breaker.record_failure(KEY)
    assert breaker.state(KEY) == "open"
    assert breaker.state("anthropic:claude-haiku-4-5") == "closed"


def test_two_workers_share_state_through_redis(redis_store):
    """Two breakers on one Redis prefix (two workers) see each other's failures and probe."""
    client, prefix = redis_store
    clock = Clock()
    worker_a = CircuitBreaker(
        RedisBreakerStore(client, prefix), failures=2, reset_s=10, clock=clock
    )
    worker_b = CircuitBreaker(
        RedisBreakerStore(client, prefix), failures=2, reset_s=10, clock=clock
    )
    worker_a.record_failure(KEY)
    worker_b.record_failure(KEY)
    assert worker_a.state(KEY) == "open"
    assert not worker_a.allow(KEY)
    clock.now += 10
    assert worker_b.allow(KEY)
    assert not worker_a.allow(KEY)
    worker_b.record_success(KEY)
    assert worker_a.allow(KEY)
    assert worker_a.state(KEY) == "closed"


def test_only_one_of_many_concurrent_callers_gets_the_probe(redis_store):
    """Racing callers in half-open state, each with its own client, get exactly one probe."""
    client, prefix = redis_store
    clock = Clock()
    opener = CircuitBreaker(RedisBreakerStore(client, prefix), failures=1, reset_s=10, clock=clock)
    opener.record_failure(KEY)
    clock.now += 10
    clients = [redis.Redis(host="127.0.0.1", port=6379) for _ in range(8)]
    start = threading.Barrier(len(clients))
    results: list[bool] = []
    lock = threading.Lock()

    def race(worker_client):
        breaker = CircuitBreaker(
            RedisBreakerStore(worker_client, prefix), failures=1, reset_s=10, clock=clock
        )
        start.wait(timeout=60)
        allowed = breaker.allow(KEY)
        with lock:
            results.append(allowed)

    threads = [threading.Thread(target=race, args=(c,)) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for worker_client in clients:
        worker_client.close()
    assert sorted(results) == [False] * 7 + [True]


def test_redis_records_live_under_the_prefix_with_a_ttl(redis_store):
    """An open breaker is one expiring key under {prefix}:breaker:; closing deletes it."""
    client, prefix = redis_store
    breaker = CircuitBreaker(RedisBreakerStore(client, prefix), failures=1, reset_s=10)
    breaker.record_failure(KEY)
    name = f"{prefix}:breaker:{KEY}"
    assert client.exists(name)
    assert 0 < client.ttl(name) <= 80
    breaker.record_success(KEY)
    assert not client.exists(name)


def test_a_breaker_refuses_nonsense_settings():
    """Zero failures or a non-positive reset time are configuration errors."""
    with pytest.raises(ValueError, match="failures"):
        CircuitBreaker(LocalBreakerStore(), failures=0, reset_s=10)
    with pytest.raises(ValueError, match="reset_s"):
        CircuitBreaker(LocalBreakerStore(), failures=1, reset_s=0)


def test_an_unreachable_redis_is_a_coordination_error():
    """A Redis that does not answer surfaces as CoordinationError (transient), not a crash."""
    # No retries: the default policy backs off for seconds before giving up.
    client = redis.Redis(host="127.0.0.1", port=1, retry=Retry(NoBackoff(), 0))
    breaker = CircuitBreaker(RedisBreakerStore(client, "nowhere"), failures=1, reset_s=10)
    with pytest.raises(CoordinationError, match="breaker store"):
        breaker.allow(KEY)
    with pytest.raises(CoordinationError, match="breaker store"):
        breaker.record_failure(KEY)
    client.close()
