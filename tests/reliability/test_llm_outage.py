"""The LLM API down for a while (5xx, then timeouts) and a 429 storm, with messages flowing.

While the provider fails, messages the policy sends to the LLM are answered by the BERT tier
and flagged (``llm_skipped: llm_unavailable``, ``llm_error`` saying why); nothing waits for
the LLM to come back. The circuit breaker, shared through Redis, opens after
``TIERGATE_BREAKER_FAILURES`` consecutive failures, lets one probe through every
``TIERGATE_BREAKER_RESET_S``, and closes on the first probe that succeeds.

Under a 429 storm the SDK retries (``TIERGATE_LLM_MAX_RETRIES``) after the ``Retry-After`` the
provider sent. The policy's calls-per-minute budget counts reservations, one per message put
to the LLM, not HTTP attempts: with retries one reservation may cost up to
``1 + TIERGATE_LLM_MAX_RETRIES`` requests, which is the bound checked here.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import redis

from cluster import Cluster, Producer, StreamTail, unlimited_policy, wait_until
from tiergate.gateway.client import TiergateClient
from tiergate.policies.spec import BudgetSpec
from tiergate.workers.llm.testing import Fail, FakeLLMServer, Stall, message_of
from tiergate.workers.schemas import Decision, LLMSkip, Tier

pytestmark = pytest.mark.reliability

BREAKER_FAILURES = 3
BREAKER_RESET_S = 2.0
# Far above a healthy answer's time (20 ms), so that only the stalled provider times out.
LLM_TIMEOUT_S = 5.0
# Routed messages answered by the LLM once it is back, before the producer stops.
RECOVERED = 10


class BreakerWatch:
    """Samples one breaker's shared state in Redis every 50 ms.

    Keeps each change of state as sampled, and each time the breaker (re)opened as the breaker
    recorded it (``opened_at``, wall-clock seconds).
    """

    def __init__(self, cluster: Cluster, key: str, reset_s: float) -> None:
        self.client = redis.Redis.from_url(cluster.settings.redis_url or "")
        self.name = f"{cluster.settings.cache_prefix}:breaker:{key}"
        self.reset_s = reset_s
        self.changes: list[tuple[float, str]] = [(time.monotonic(), "closed")]
        self.opened_at: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="breaker-watch", daemon=True)

    def state(self) -> str:
        """``closed``, ``open`` or ``half_open``, as the breaker itself would say now."""
        raw = self.client.hget(self.name, "opened_at")
        if raw is None:
            return "closed"
        opened_at = float(raw)
        if opened_at not in self.opened_at:
            self.opened_at.append(opened_at)
        return "open" if time.time() < opened_at + self.reset_s else "half_open"

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            state = self.state()
            if state != self.changes[-1][1]:
                self.changes.append((time.monotonic(), state))

    @contextmanager
    def watching(self) -> Iterator[BreakerWatch]:
        """Sample in a background thread for the duration of the block."""
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(timeout=60)
            self.client.close()

    def first(self, state: str, after: float = 0.0) -> float | None:
        """When the breaker was first seen in ``state`` at or after ``after`` (monotonic)."""
        return next((at for at, seen in self.changes if seen == state and at >= after), None)

    def closed_since(self) -> float | None:
        """When the breaker was last seen to close, if it is still seen closed (monotonic)."""
        at, state = self.changes[-1]
        return at if state == "closed" else None


def routed(decision: Decision) -> bool:
    """Whether the policy sent the message to the LLM (answered there or flagged why not)."""
    return decision.tier is Tier.LLM or decision.llm_skipped is not None


def seen(
    tail: StreamTail, producer: Producer, since: float, test: Callable[[Decision], bool]
) -> bool:
    """Whether a decision of the producer's messages read at or after ``since`` passes ``test``."""
    ids = set(producer.accepted())
    return any(test(d) for i, at, d in tail.entries() if at >= since and i in ids)


def flagged_with(kind: str) -> Callable[[Decision], bool]:
    """A test for flagged decisions whose LLM error is of this kind (see ``_error_kind``)."""
    return lambda d: d.llm_skipped is not None and _error_kind(d.llm_error or "") == kind


def test_llm_down_for_a_while_decisions_keep_coming_and_the_breaker_opens_then_closes(
    make_cluster, fake_llm, snippets, figures
):
    """5xx then timeouts: flagged BERT answers meanwhile, breaker open, then closed."""
    cluster = make_cluster(
        "rabbitmq",
        policy=unlimited_policy(),
        TIERGATE_LLM_TIMEOUT_S=str(LLM_TIMEOUT_S),
        TIERGATE_BREAKER_FAILURES=str(BREAKER_FAILURES),
        TIERGATE_BREAKER_RESET_S=str(BREAKER_RESET_S),
    )
    fake_llm.latency_s = 0.02
    client = TiergateClient.from_settings(cluster.settings)
    cluster.start_worker("bert", concurrency=2)
    cluster.start_worker("llm", concurrency=4)
    cluster.warm_up(client, snippets[-1])
    watch = BreakerWatch(cluster, "openai:gpt-4o-mini", BREAKER_RESET_S)
    tail = StreamTail(cluster.settings.redis_url or "", cluster.settings.decisions_stream)
    producer = Producer(client, snippets[:-1], per_s=20, prefix="o", chunk=5)
    marks: dict[str, float] = {}
    # Each phase of the provider lasts until what it provokes has been seen.
    with tail, watch.watching():
        calls_before = fake_llm.calls
        with producer:
            wait_until(
                lambda: seen(tail, producer, 0.0, lambda d: d.tier is Tier.LLM),
                120,
                cluster,
                "an LLM answer while the provider is healthy",
            )
            marks["down"] = time.monotonic()
            fake_llm.set_outage(Fail(503))
            wait_until(
                lambda: (
                    seen(tail, producer, marks["down"], flagged_with("http 503"))
                    and seen(tail, producer, marks["down"], flagged_with("breaker open"))
                ),
                120,
                cluster,
                "answers flagged for 503s, then for the breaker open",
            )
            marks["stall"] = time.monotonic()
            fake_llm.set_outage(Stall(600))  # never answers: each call times out
            wait_until(
                lambda: seen(tail, producer, marks["stall"], flagged_with("timeout")),
                120,
                cluster,
                "an answer flagged for a timed-out call",
            )
            marks["up"] = time.monotonic()  # before a probe can close the breaker
            fake_llm.set_outage(None)
            # Once every message sent so far is decided, every call of the outage has ended:
            # none can fail later.
            missing = tail.wait_for(producer.accepted(), timeout_s=120)
            assert not missing, f"{len(missing)} not answered\n{cluster.log_text()}"
            # Routed messages sent after the breaker's last close, answered while it stays so.
            recovered: list[Decision] = []

            def llm_back() -> bool:
                since = watch.closed_since()
                if since is None or since < marks["up"]:
                    return False
                accepted_at = producer.accepted_at()
                recovered[:] = [
                    d for i, _, d in tail.entries() if accepted_at.get(i, 0.0) > since and routed(d)
                ]
                return len(recovered) >= RECOVERED

            wait_until(llm_back, 120, cluster, f"{RECOVERED} routed messages after the recovery")
        assert producer.error is None, producer.error
        submitted = producer.accepted_at()
        missing = tail.wait_for(submitted, timeout_s=600)
        assert not missing, f"{len(missing)} never answered\n{cluster.log_text()}"
        # A second decision of a message would be on the stream before the sentinel's.
        cluster.send_sentinel(client)
        wait_until(lambda: watch.state() == "closed", 60, cluster, "the breaker closed")
        ids = [i for i in tail.ids() if i in submitted]
    read = {i: (at, d) for i, at, d in tail.entries() if i in submitted}
    latency = {i: at - submitted[i] for i, (at, _) in read.items()}
    decisions = {i: d for i, (_, d) in read.items()}
    flagged = [d for d in decisions.values() if d.llm_skipped is not None]
    errors = Counter(_error_kind(d.llm_error or "") for d in flagged)
    wall = time.time() - time.monotonic()
    outage_calls = [r for r in fake_llm.requests if marks["down"] <= r.at - wall <= marks["up"]]
    opened = watch.opened_at[0] - wall if watch.opened_at else None
    closed = watch.first("closed", marks["up"])
    recovered_by = Counter(_error_kind(d.llm_error or "") or d.tier.value for d in recovered)
    figures.record(
        messages=len(submitted),
        outage_s=marks["up"] - marks["down"],
        llm_calls=fake_llm.calls - calls_before,
        llm_calls_during_outage=len(outage_calls),
        flagged_llm_unavailable=len(flagged),
        flagged_by_error=dict(errors),
        breaker_open_after_s=(opened - marks["down"]) if opened else None,
        breaker_closed_after_recovery_s=(closed - marks["up"]) if closed else None,
        breaker_opened=len(watch.opened_at),
        breaker_changes=[state for _, state in watch.changes],
        decisions_by_tier=dict(Counter(d.tier.value for d in decisions.values())),
        recovered_by=dict(recovered_by),
        latency_max_s=max(latency.values()),
        duplicates=len(ids) - len(set(ids)),
    )
    assert len(ids) == len(set(ids)) == len(submitted), "one decision per message"
    assert max(latency.values()) < 120, "no message waited for the LLM to come back"
    assert {d.llm_skipped for d in flagged} == {LLMSkip.LLM_UNAVAILABLE}
    assert all(d.tier is Tier.BERT and d.label == max(d.scores, key=d.scores.get) for d in flagged)
    assert errors["http 503"] > 0, errors
    assert errors["breaker open"] > 0, errors
    assert errors["timeout"] > 0, errors
    assert opened is not None, watch.changes
    assert closed is not None, watch.changes
    # The breaker kept the calls during the outage to the failures that opened it, one probe
    # per reset period, and the calls already in flight (one per LLM thread).
    probes = (marks["up"] - marks["down"]) / BREAKER_RESET_S + 1
    assert len(outage_calls) <= BREAKER_FAILURES + 4 + probes, len(outage_calls)
    # Once closed, the LLM answers: a healthy call slower than the timeout on a loaded machine
    # is the only failure allowed, and no message meets the breaker open.
    assert any(d.tier is Tier.LLM for d in recovered), recovered_by
    assert recovered_by.keys() <= {Tier.LLM.value, "timeout"}, recovered_by


def test_a_429_storm_is_ridden_out_within_the_calls_per_minute_budget(
    make_cluster, fake_llm: FakeLLMServer, snippets, figures
):
    """All 429s (Retry-After 1 s) for 8 s: every message answered, the budget never exceeded."""
    budget, retries = 40, 2
    policy = unlimited_policy().model_copy(update={"budget": BudgetSpec(calls_per_minute=budget)})
    cluster = make_cluster(
        "rabbitmq",
        policy=policy,
        TIERGATE_LLM_MAX_RETRIES=str(retries),
        TIERGATE_BREAKER_RESET_S="3",
    )
    fake_llm.latency_s = 0.02
    client = TiergateClient.from_settings(cluster.settings)
    cluster.start_worker("bert", concurrency=2)
    cluster.start_worker("llm", concurrency=8)
    cluster.warm_up(client, snippets[-1])
    producer = Producer(client, snippets[:-1], per_s=12, prefix="s", chunk=5)
    marks: dict[str, float] = {}
    tail = StreamTail(cluster.settings.redis_url or "", cluster.settings.decisions_stream)
    # 2 s healthy, 8 s of 429s, 8 s healthy again; the first two last until they show.
    with tail:
        with producer:
            started = time.monotonic()
            wait_until(
                lambda: seen(tail, producer, 0.0, lambda d: d.tier is Tier.LLM),
                120,
                cluster,
                "an LLM answer before the storm",
            )
            time.sleep(max(0.0, started + 2.0 - time.monotonic()))
            marks["storm"] = time.monotonic()
            fake_llm.set_outage(Fail(429, retry_after=1))
            wait_until(
                lambda: seen(
                    tail,
                    producer,
                    marks["storm"],
                    lambda d: d.llm_skipped is LLMSkip.LLM_UNAVAILABLE,
                ),
                120,
                cluster,
                "an answer flagged llm_unavailable in the storm",
            )
            time.sleep(max(0.0, marks["storm"] + 8.0 - time.monotonic()))
            marks["over"] = time.monotonic()
            fake_llm.set_outage(None)
            time.sleep(8.0)
        assert producer.error is None, producer.error
        submitted = producer.accepted_at()
        missing = tail.wait_for(submitted, timeout_s=600)
        assert not missing, f"{len(missing)} never answered\n{cluster.log_text()}"
        entries = [(i, at, d) for i, at, d in tail.entries() if i in submitted]
    reservations = _calls_reserved(cluster, policy.name)
    requests = [r for r in fake_llm.requests if message_of(r.body) != snippets[-1]]
    per_minute = Counter(int(r.at // 60) for r in requests)
    by_text: dict[str, list[float]] = {}
    for request in requests:
        by_text.setdefault(message_of(request.body), []).append(request.at)
    gaps = [b - a for times in by_text.values() for a, b in itertools.pairwise(times)]
    decisions = {i: d for i, _, d in entries}
    latency = max(at - submitted[i] for i, at, _ in entries)
    outcome = Counter(
        d.tier.value if d.llm_skipped is None else f"bert ({d.llm_skipped.value})"
        for d in decisions.values()
    )
    figures.record(
        messages=len(submitted),
        budget_calls_per_minute=budget,
        llm_max_retries=retries,
        storm_s=marks["over"] - marks["storm"],
        llm_requests=len(requests),
        responses_429=fake_llm.statuses.get(429, 0),
        reservations_per_minute=reservations,
        # Reservations spent by messages that found the breaker open and asked nothing.
        reservations_without_a_request=sum(reservations.values())
        - len({message_of(r.body) for r in fake_llm.requests}),
        requests_per_minute=dict(per_minute),
        min_gap_between_retries_s=min(gaps) if gaps else None,
        decisions=dict(outcome),
        latency_max_s=latency,
    )
    ids = [i for i, _, _ in entries]
    assert len(ids) == len(set(ids)) == len(submitted), "one decision per message"
    assert latency < 120, "no message stuck behind the storm"
    assert fake_llm.statuses.get(429, 0) > 0
    assert outcome["llm"] > 0, outcome
    assert outcome[f"bert ({LLMSkip.LLM_UNAVAILABLE.value})"] > 0, outcome
    assert reservations, "the budget counted the calls"
    assert max(reservations.values()) <= budget, reservations
    assert max(per_minute.values()) <= budget * (1 + retries), per_minute
    # The SDK waited out each Retry-After (1 s) before asking again.
    assert gaps, "some requests were retried"
    assert min(gaps) >= 0.9, sorted(gaps)[:5]


def _error_kind(error: str) -> str:
    if "circuit breaker open" in error:
        return "breaker open"
    if "timed out" in error:
        return "timeout"
    if "HTTP 503" in error:
        return "http 503"
    return error


def _calls_reserved(cluster: Cluster, policy: str) -> dict[int, int]:
    """The policy's budget counters in Redis: calls reserved per epoch minute."""
    client = redis.Redis.from_url(cluster.settings.redis_url or "")
    pattern = f"{cluster.settings.cache_prefix}:budget:{policy}:calls:*"
    counters = {
        int(key.rsplit(b":", 1)[1]): int(client.get(key) or 0) for key in client.scan_iter(pattern)
    }
    client.close()
    return counters
