"""Batch mode in one process: real Redis, the real SDKs against the fake server's batch APIs.

Work is queued as the LLM step queues it (:func:`hold_for_batch`), and the runner's rounds are
driven by hand (:meth:`BatchRunner.run_once`), with a settable clock for the batches' age.
"""

from __future__ import annotations

import pytest
import redis

from tiergate.policies.spec import (
    BudgetSpec,
    Escalation,
    LabelSpec,
    LLMSpec,
    PolicyError,
    PolicySpec,
    ProviderRef,
)
from tiergate.workers.batches import (
    MAX_BATCH_TRIES,
    BatchRunner,
    BatchState,
    BatchStore,
    hold_for_batch,
    outstanding_json,
)
from tiergate.workers.budget import RedisBudgetLedger
from tiergate.workers.cache import RedisDecisionCache
from tiergate.workers.cascade import Cascade, LLMWork, PolicyBook, check_batch_mode
from tiergate.workers.ledger import RedisDecisionLedger
from tiergate.workers.llm.breaker import LocalBreakerStore
from tiergate.workers.llm.testing import FakeLLMServer
from tiergate.workers.llm.testing_batches import BatchPlan
from tiergate.workers.llm.tier import LLMTier
from tiergate.workers.schemas import Decision, LLMMode, Message, Status, Tier
from tiergate.workers.settings import Price, Settings
from tiergate.workers.testing import FixedScoreClassifier

LABELS = ("negative", "positive")
UNSURE = (0.55, 0.45)  # below the policy's 0.8: every message goes to the LLM
PRICE = Price(input_per_mtok=1.0, output_per_mtok=4.0, batch_discount=0.5)
# The budgets' fixed clock: 10 s into a UTC minute, so no test straddles a minute boundary.
BUDGET_NOW = 1_700_000_010.0


class Clock:
    """A settable clock (epoch seconds) for the batch store."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def policy(provider: str = "openai", **llm: object) -> PolicySpec:
    """A two-label batch-mode policy escalating below 0.8; ``llm`` changes its LLM section."""
    model = "gpt-4o-mini" if provider == "openai" else "claude-haiku-4-5"
    return PolicySpec(
        name="films",
        version="1",
        labels=[LabelSpec(name=n, description=f"a {n} snippet") for n in LABELS],
        escalation=Escalation(min_probability=0.8),
        llm=LLMSpec(
            providers=[ProviderRef(provider=provider, model=model)],
            mode="batch",
            **{"max_batch": 3, "max_wait_s": 600.0, **llm},
        ),
    )


class Rig:
    """A cascade, ledger, batch store and runner over real Redis and the fake server."""

    def __init__(self, server: FakeLLMServer, prefix: str, spec: PolicySpec, **budget: object):
        self.server = server
        self.clock = Clock()
        client = redis.Redis(host="127.0.0.1", port=6379)
        self.settings = Settings(
            openai_api_key="k",
            openai_base_url=server.openai_base_url,
            anthropic_api_key="k",
            anthropic_base_url=server.anthropic_base_url,
            llm_max_retries=0,
            llm_prices={"gpt-4o-mini": PRICE, "claude-haiku-4-5": PRICE},
        )
        if budget:
            spec = spec.model_copy(update={"budget": BudgetSpec(**budget)})  # type: ignore[arg-type]
        self.spec = spec
        self.budget = RedisBudgetLedger(client, prefix, clock=lambda: BUDGET_NOW)
        self.cascade = Cascade(
            FixedScoreClassifier(LABELS, {}, default=UNSURE),
            PolicyBook([spec]),
            llm=LLMTier(self.settings, breaker_store=LocalBreakerStore()),
            cache=RedisDecisionCache(client, prefix),
            budget=self.budget,
        )
        self.ledger = RedisDecisionLedger(client, prefix=prefix, stream=f"{prefix}:decisions")
        self.store = BatchStore(client, prefix, clock=self.clock)
        self.delivered: list[Decision] = []
        self.runner = BatchRunner(
            self.cascade, self.ledger, self.store, self.settings, self.delivered.append
        )

    def queue(self, *texts: str, prefix: str = "m") -> list[Message]:
        """Run the BERT step on ``texts`` and hand their LLM work to the batch queue."""
        messages = [Message(id=f"{prefix}{i}", text=t) for i, t in enumerate(texts)]
        for item in self.cascade.first_pass(messages):
            assert isinstance(item, LLMWork)
            assert hold_for_batch(self.cascade, self.ledger, self.store, item) is None
        return messages

    def decisions(self, messages: list[Message]) -> list[Decision | None]:
        """Each message's decision in the ledger (final, or pending)."""
        return self.ledger.get_many([m.id for m in messages])

    def stream_ids(self) -> list[str]:
        """The ids on the decisions stream, in order."""
        entries = self.ledger.client.xrange(self.ledger.stream)
        return [fields[b"id"].decode() for _, fields in entries]


@pytest.fixture
def server():
    """The fake provider, its batches ending as soon as they are next read."""
    with FakeLLMServer() as fake:
        yield fake


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_full_batch_is_sent_and_each_message_answered_once_at_batch_prices(
    server, redis_prefix, provider
):
    """Messages wait (pending_llm) until max_batch do; then one batch answers each once."""
    rig = Rig(server, redis_prefix, policy(provider))
    first = rig.queue("one", "two")
    rig.runner.run_once()
    assert server.batches.submitted == [], "two of three: no batch yet"
    pending = rig.decisions(first)
    assert all(d is not None and d.status is Status.PENDING_LLM for d in pending)
    assert all(d is not None and d.tier is Tier.BERT for d in pending)
    assert rig.stream_ids() == [], "a pending decision is not delivered"
    third = rig.queue("three", prefix="n")
    rig.runner.run_once()  # claims and sends
    rig.runner.run_once()  # polls: ended, delivered
    assert len(server.batches.submitted) == 1
    assert server.calls == 0
    final = rig.decisions(first + third)
    assert all(d is not None and d.status is Status.ANSWERED for d in final)
    assert {d.tier for d in final if d} == {Tier.LLM}
    assert all(d.llm is not None and d.llm.mode is LLMMode.BATCH for d in final if d)
    for decision in final:
        assert decision is not None
        assert decision.llm is not None
        full = PRICE.cost(decision.llm.input_tokens, decision.llm.output_tokens)
        assert decision.llm.cost_usd == pytest.approx(full / 2)
    assert sorted(rig.stream_ids()) == ["m0", "m1", "n0"]
    assert sorted(d.id for d in rig.delivered) == ["m0", "m1", "n0"]
    assert rig.store.outstanding() == []


def test_the_oldest_message_waiting_max_wait_s_sends_a_partial_batch(server, redis_prefix):
    """A batch smaller than max_batch goes once its oldest message waited max_wait_s."""
    rig = Rig(server, redis_prefix, policy(max_wait_s=60.0))
    messages = rig.queue("alone")
    rig.clock.now += 59
    rig.runner.run_once()
    assert server.batches.submitted == []
    rig.clock.now += 1
    rig.runner.run_once()
    rig.runner.run_once()
    assert len(server.batches.submitted) == 1
    decision = rig.decisions(messages)[0]
    assert decision is not None
    assert decision.tier is Tier.LLM


def test_identical_messages_cost_one_request_and_the_answer_is_cached(server, redis_prefix):
    """Messages sharing a cache key are one request; the others reuse it; a later one hits."""
    rig = Rig(server, redis_prefix, policy())
    # Handed to the LLM step before the batch answered, queued for it after.
    late = rig.cascade.first_pass([Message(id="late", text="same")])[0]
    messages = rig.queue("same", "same", "other")
    rig.runner.run_once()
    rig.runner.run_once()
    assert len(server.batches.submitted[0].requests) == 2
    same = [d for d in rig.decisions(messages)[:2] if d is not None]
    assert sorted(d.llm.attempts for d in same if d.llm) == [0, 1]
    assert isinstance(late, LLMWork)
    cached = hold_for_batch(rig.cascade, rig.ledger, rig.store, late)
    assert cached is not None
    assert cached.cached
    assert cached.tier is Tier.LLM
    assert cached.llm is not None
    assert cached.llm.attempts == 0
    later = rig.cascade.first_pass([Message(id="later", text="same")])[0]
    assert isinstance(later, Decision)
    assert later.cached, "the BERT step finds it cached"


@pytest.mark.parametrize(
    "plan",
    [BatchPlan(errored=frozenset({1})), BatchPlan(expire_after=1)],
    ids=["errored", "expired"],
)
def test_failed_requests_are_answered_online_when_the_policy_says_online(
    server, redis_prefix, plan
):
    """An errored or expired request is asked online at once; the rest keep batch answers."""
    rig = Rig(server, redis_prefix, policy(on_batch_error="online"))
    server.batches.plan(plan)
    messages = rig.queue("a", "b", "c")
    rig.runner.run_once()
    rig.runner.run_once()
    decisions = rig.decisions(messages)
    assert all(d is not None and d.status is Status.ANSWERED for d in decisions)
    modes = [d.llm.mode for d in decisions if d and d.llm]
    assert modes.count(LLMMode.ONLINE) == (1 if plan.errored else 2)
    assert server.calls == modes.count(LLMMode.ONLINE)
    assert len(server.batches.submitted) == 1
    assert sorted(rig.stream_ids()) == ["m0", "m1", "m2"]


def test_failed_requests_join_the_next_batch_when_the_policy_says_next_batch(server, redis_prefix):
    """An expired request waits for the next batch, which answers it; nothing goes online."""
    rig = Rig(server, redis_prefix, policy(on_batch_error="next_batch", max_wait_s=10.0))
    server.batches.plan(BatchPlan(expire_after=2))
    messages = rig.queue("a", "b", "c")
    rig.runner.run_once()
    rig.runner.run_once()
    statuses = [d.status for d in rig.decisions(messages) if d is not None]
    assert sorted(statuses) == ["answered", "answered", "pending_llm"]
    rig.clock.now += 10
    rig.runner.run_once()
    rig.runner.run_once()
    assert len(server.batches.submitted) == 2
    assert [len(b.requests) for b in server.batches.submitted] == [3, 1]
    assert server.calls == 0
    decisions = rig.decisions(messages)
    assert all(d is not None and d.llm and d.llm.mode is LLMMode.BATCH for d in decisions)


def test_a_request_failing_in_every_batch_is_finally_asked_online(server, redis_prefix):
    """next_batch gives up after MAX_BATCH_TRIES failed batches and asks online."""
    rig = Rig(server, redis_prefix, policy(on_batch_error="next_batch", max_wait_s=10.0))
    server.batches.plan(*[BatchPlan(errored=frozenset({0}))] * MAX_BATCH_TRIES)
    messages = rig.queue("stubborn")
    for _ in range(MAX_BATCH_TRIES):
        rig.clock.now += 10
        rig.runner.run_once()
        rig.runner.run_once()
    assert len(server.batches.submitted) == MAX_BATCH_TRIES
    decision = rig.decisions(messages)[0]
    assert decision is not None
    assert decision.llm is not None
    assert decision.llm.mode is LLMMode.ONLINE
    assert server.calls == 1


class CrashAfterSubmitError(Exception):
    """The worker 'dies' after the provider accepted the batch, before its id is recorded."""


def test_a_batch_sent_by_a_worker_that_died_before_recording_it_is_not_sent_again(
    server, redis_prefix
):
    """A record left 'submitting' is found at the provider by its tag, not sent twice."""
    rig = Rig(server, redis_prefix, policy())
    messages = rig.queue("a", "b", "c")
    save = rig.store.save

    def crash_on_submitted(record):
        if record.state is BatchState.SUBMITTED:
            raise CrashAfterSubmitError
        save(record)

    rig.store.save = crash_on_submitted  # type: ignore[method-assign]
    rig.runner.run_once()  # the round logs the crash and leaves the batch
    rig.store.save = save  # type: ignore[method-assign]
    [left] = rig.store.outstanding()
    assert left.state is BatchState.SUBMITTING
    assert len(server.batches.submitted) == 1
    restarted = BatchRunner(rig.cascade, rig.ledger, rig.store, rig.settings)
    restarted.run_once()  # recovers the id
    restarted.run_once()  # polls and delivers
    assert len(server.batches.submitted) == 1
    assert sorted(rig.stream_ids()) == [m.id for m in messages]


def test_batch_budgets_reserve_at_batch_prices_and_are_never_exceeded(server, redis_prefix):
    """A day's dollars fit twice as many batch requests as online ones, and no more."""
    rig = Rig(server, redis_prefix, policy(max_batch=6))
    llm = rig.cascade.llm
    assert llm is not None
    online = llm.estimate_cost(rig.spec, "text 0")
    batch = llm.estimate_cost(rig.spec, "text 0", batch=True)
    assert batch == pytest.approx(online / 2)
    rig = Rig(server, redis_prefix, policy(max_batch=6), usd_per_day=batch * 3.5)
    messages = rig.queue(*[f"text {i}" for i in range(6)])
    rig.runner.run_once()
    rig.runner.run_once()
    decisions = [d for d in rig.decisions(messages) if d is not None]
    assert len(decisions) == 6
    by_tier = [d.tier for d in decisions]
    assert by_tier.count(Tier.LLM) == 3
    assert all(d.llm_skipped == "budget_exhausted" for d in decisions if d.tier is Tier.BERT)
    spent = sum(d.llm.cost_usd for d in decisions if d.llm)
    assert spent <= batch * 3.5
    assert rig.budget.state("films", rig.spec.budget).usd_left is not None


def test_outstanding_batches_are_listed_with_their_age(server, redis_prefix):
    """An unfinished batch is listed with its provider, size and age."""
    rig = Rig(server, redis_prefix, policy())
    server.batches.plan(BatchPlan(hold=True))
    rig.queue("a", "b", "c")
    rig.runner.run_once()
    [listed] = outstanding_json(rig.store, now=rig.clock.now + 90)
    assert listed["state"] == "submitted"
    assert (listed["provider"], listed["requests"], listed["messages"]) == ("openai", 3, 3)
    assert listed["age_s"] == pytest.approx(90.0)


def test_a_batch_mode_policy_is_refused_without_a_broker_and_redis():
    """The CLI and embedded gateway cannot send batches: the policy is refused by name."""
    with pytest.raises(PolicyError, match=r"films.*llm\.mode: batch"):
        check_batch_mode(Settings(), [policy()])
    check_batch_mode(
        Settings(broker_url="redis://127.0.0.1:6379/1", redis_url="redis://127.0.0.1:6379/0"),
        [policy()],
    )
