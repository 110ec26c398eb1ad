"""The cascade with its LLM tier: the real SDKs against a local fake provider, real Redis.

Every test checks that each message gets exactly one decision, and counts the calls that
reached the fake provider.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from tiergate.policies.routing import Reason
from tiergate.policies.spec import (
    Band,
    BudgetSpec,
    Escalation,
    LabelSpec,
    LLMSpec,
    PolicySpec,
    ProviderRef,
    Task,
)
from tiergate.workers.budget import RedisBudgetLedger
from tiergate.workers.cache import RedisDecisionCache
from tiergate.workers.cascade import Cascade, PolicyBook
from tiergate.workers.llm.breaker import LocalBreakerStore, RedisBreakerStore
from tiergate.workers.llm.testing import (
    Fail,
    FakeLLMServer,
    Refuse,
    Respond,
    RespondRaw,
    Stall,
    message_of,
)
from tiergate.workers.llm.tier import LLMTier
from tiergate.workers.schemas import LLMSkip, Message, Tier
from tiergate.workers.settings import Settings
from tiergate.workers.testing import FixedScoreClassifier

LABELS = ("negative", "positive", "synopsis")
CONFIDENT = (0.95, 0.03, 0.02)
UNSURE = (0.45, 0.35, 0.2)
# The budgets' fixed clock: 10 s into a UTC minute, so no test straddles a minute boundary.
BUDGET_NOW = 1_700_000_010.0


class Clock:
    """A settable clock for the circuit breakers of one test (seconds as a float)."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def policy(**changes) -> PolicySpec:
    """A films policy escalating below 0.8, asking the fake server as OpenAI."""
    spec = PolicySpec(
        name="films",
        version="1",
        labels=[LabelSpec(name=n, description=f"a {n} snippet") for n in LABELS],
        escalation=Escalation(min_probability=0.8),
        llm=LLMSpec(providers=[ProviderRef(provider="openai", model="gpt-4o-mini")]),
    )
    return spec.model_copy(update=changes)


def answering(label: str, text: str | None = None):
    """An answerer that always gives ``label`` (and ``text`` when set)."""

    def answer(_body: dict) -> dict:
        return {"label": label} if text is None else {"label": label, "text": text}

    return answer


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    """The fake provider, stopped after the test."""
    with FakeLLMServer() as fake:
        yield fake


def settings_for(server: FakeLLMServer, **overrides) -> Settings:
    """Settings pointing the OpenAI provider at the fake server, with no SDK retries.

    The timeout is far above any local answer, so only a stalled server reaches it.
    """
    values = {
        "openai_api_key": "test-key",
        "openai_base_url": server.openai_base_url,
        "llm_timeout_s": 10.0,
        "llm_max_retries": 0,
        "breaker_failures": 50,
    }
    return Settings(**{**values, **overrides})


def cascade_for(
    server: FakeLLMServer,
    *specs: PolicySpec,
    redis_prefix: str | None = None,
    scores: dict | None = None,
    multi_label: bool = False,
    **settings_overrides,
) -> Cascade:
    """A cascade over a fixed-score classifier, the LLM tier at the fake server, and Redis."""
    settings = settings_for(server, **settings_overrides)
    client = redis.Redis(host="127.0.0.1", port=6379) if redis_prefix else None
    budget = RedisBudgetLedger(client, redis_prefix, clock=lambda: BUDGET_NOW) if client else None
    return Cascade(
        FixedScoreClassifier(
            LABELS,
            scores or {},
            default=CONFIDENT if not multi_label else (0.9, 0.1, 0.0),
            multi_label=multi_label,
        ),
        PolicyBook(specs or [policy()]),
        llm=LLMTier(settings, breaker_store=LocalBreakerStore()),
        cache=RedisDecisionCache(client, redis_prefix) if client else None,
        budget=budget,
        single_flight_timeout_s=60.0,
    )


def test_routed_message_is_answered_by_the_llm_then_from_the_cache(server, redis_prefix):
    """A low-confidence message takes the LLM's label, with cost; its repeat costs nothing."""
    server.script(Respond({"label": "positive"}))
    cascade = cascade_for(server, redis_prefix=redis_prefix, scores={"hard": UNSURE})
    easy, hard = cascade.decide([Message(id="e", text="easy"), Message(id="h", text="hard")])
    assert (easy.tier, easy.label) == (Tier.BERT, "negative")
    assert (hard.tier, hard.reason, hard.label) == (Tier.LLM, Reason.LOW_CONFIDENCE, "positive")
    assert hard.llm is not None
    assert hard.llm.cost_usd > 0
    assert hard.llm.input_tokens > 0
    assert "llm" in hard.timings_ms
    again = cascade.decide([Message(id="h2", text="hard")])[0]
    assert (again.id, again.cached, again.tier, again.label) == ("h2", True, Tier.LLM, "positive")
    assert server.calls == 1


def test_hundred_concurrent_identical_escalations_make_one_upstream_call(server, redis_prefix):
    """100 threads over four cascades (four workers) sharing Redis cause exactly one LLM call."""
    server.latency_s = 0.3
    server.script(Respond({"label": "synopsis"}))
    workers = [
        cascade_for(server, redis_prefix=redis_prefix, scores={"same text": UNSURE})
        for _ in range(4)
    ]
    barrier = threading.Barrier(100)

    def one(i: int):
        barrier.wait()
        return workers[i % 4].decide([Message(id=f"m{i}", text="same text")])[0]

    with ThreadPoolExecutor(max_workers=100) as pool:
        decisions = list(pool.map(one, range(100)))
    assert server.calls == 1
    assert sorted(d.id for d in decisions) == sorted(f"m{i}" for i in range(100))
    assert {(d.tier, d.label) for d in decisions} == {(Tier.LLM, "synopsis")}
    assert sum(not d.cached for d in decisions) == 1


def test_identical_messages_in_one_batch_share_a_call_without_a_cache(server):
    """Duplicates inside a batch are asked once even with no cache configured."""
    cascade = cascade_for(server, scores={"dup": UNSURE})
    decisions = cascade.decide([Message(id=str(i), text="dup") for i in range(5)])
    assert [d.id for d in decisions] == ["0", "1", "2", "3", "4"]
    assert {d.tier for d in decisions} == {Tier.LLM}
    assert server.calls == 1


@pytest.mark.parametrize(
    ("fault", "calls", "skip", "detail", "timeout_s"),
    [
        (Fail(500), 1, LLMSkip.LLM_UNAVAILABLE, "500", 10.0),
        # The stall needs a timeout that fires; 3 s still leaves the recovered call room.
        (Stall(600), 1, LLMSkip.LLM_UNAVAILABLE, "timed out", 3.0),
        (RespondRaw("this is not json"), 2, LLMSkip.INVALID_ANSWER, "repair", 10.0),
        (Respond({"label": "brilliant"}), 2, LLMSkip.INVALID_ANSWER, "brilliant", 10.0),
        (Refuse("I cannot help with that."), 1, LLMSkip.INVALID_ANSWER, "refus", 10.0),
    ],
)
def test_llm_faults_fall_back_to_the_bert_answer_and_are_not_cached(
    server, redis_prefix, fault, calls, skip, detail, timeout_s
):
    """Each fault gives the BERT answer with the reason; once fixed, the LLM answers.

    An invalid answer gets one repair attempt (two calls); other faults are not repaired.
    """
    server.script(*[fault] * calls)
    cascade = cascade_for(
        server, redis_prefix=redis_prefix, scores={"hard": UNSURE}, llm_timeout_s=timeout_s
    )
    decision = cascade.decide([Message(id="h", text="hard")])[0]
    assert (decision.tier, decision.label, decision.llm_skipped) == (Tier.BERT, "negative", skip)
    assert decision.llm_error is not None
    assert detail in decision.llm_error.lower()
    assert server.calls == calls
    server.answerer = answering("synopsis")
    recovered = cascade.decide([Message(id="h", text="hard")])[0]
    assert (recovered.tier, recovered.label, recovered.cached) == (Tier.LLM, "synopsis", False)


@pytest.mark.parametrize(
    ("fault", "calls", "paid"),
    [
        (RespondRaw("this is not json"), 2, True),
        (Refuse("I cannot help with that."), 1, True),
        (Fail(500), 1, False),
    ],
)
def test_a_failed_llm_step_reports_and_settles_what_its_calls_cost(
    server, redis_prefix, fault, calls, paid
):
    """The fallback's llm block holds every call made for it; the budget is charged that much."""
    spec = policy(budget=BudgetSpec(usd_per_day=1.0))
    server.script(*[fault] * calls)
    cascade = cascade_for(server, spec, redis_prefix=redis_prefix, scores={"hard": UNSURE})
    decision = cascade.decide([Message(id="h", text="hard")])[0]
    assert decision.tier is Tier.BERT
    usage = decision.llm
    assert usage is not None
    assert (usage.provider, usage.model, usage.attempts) == ("openai", "gpt-4o-mini", calls)
    assert (usage.cost_usd > 0) is paid
    assert (usage.output_tokens > 0) is paid
    left = cascade.budget.state(spec.name, spec.budget).usd_left
    assert left == pytest.approx(1.0 - usage.cost_usd, abs=1e-6)


def test_a_decision_from_the_cache_shows_that_nothing_was_paid_for_it(server, redis_prefix):
    """A cache hit keeps the answering provider and model, with no call, tokens or cost."""
    cascade = cascade_for(server, redis_prefix=redis_prefix, scores={"hard": UNSURE})
    first = cascade.decide([Message(id="a", text="hard")])[0]
    again = cascade.decide([Message(id="b", text="hard")])[0]
    assert first.llm is not None
    assert first.llm.cost_usd > 0
    assert again.cached
    assert again.llm is not None
    assert (again.llm.provider, again.llm.model) == (first.llm.provider, first.llm.model)
    assert (again.llm.attempts, again.llm.input_tokens, again.llm.output_tokens) == (0, 0, 0)
    assert again.llm.cost_usd == 0.0
    assert server.calls == 1


def test_identical_messages_in_one_batch_are_paid_for_once(server):
    """One call answers five copies: one decision carries its cost, the others none."""
    cascade = cascade_for(server, scores={"dup": UNSURE})
    decisions = cascade.decide([Message(id=str(i), text="dup") for i in range(5)])
    usages = [d.llm for d in decisions]
    assert all(usage is not None for usage in usages)
    assert sorted(usage.attempts for usage in usages) == [0, 0, 0, 0, 1]
    paid = next(usage for usage in usages if usage.attempts == 1)
    assert paid.cost_usd > 0
    assert sum(usage.cost_usd for usage in usages) == paid.cost_usd
    assert server.calls == 1


def test_rate_limited_call_is_retried_after_the_servers_delay(server):
    """A 429 with Retry-After is waited out by the SDK and the LLM still answers."""
    server.script(Fail(429, retry_after=0.5), Respond({"label": "positive"}))
    cascade = cascade_for(server, scores={"hard": UNSURE}, llm_max_retries=2)
    decision = cascade.decide([Message(text="hard")])[0]
    assert (decision.tier, decision.label) == (Tier.LLM, "positive")
    assert server.calls == 2


def test_a_retry_after_over_a_minute_gives_the_bert_answer_at_once(server):
    """Three 429s asking for two minutes: one request, no wait, the flagged BERT answer."""
    server.script(*[Fail(429, retry_after=120)] * 3)
    cascade = cascade_for(server, scores={"hard": UNSURE}, llm_max_retries=2)
    decision = cascade.decide([Message(id="h", text="hard")])[0]
    assert (decision.tier, decision.label, decision.llm_skipped) == (
        Tier.BERT,
        "negative",
        LLMSkip.LLM_UNAVAILABLE,
    )
    assert "429" in (decision.llm_error or "")
    assert server.calls == 1


def test_reply_task_gets_generated_text_and_personal_data_never_leaves(server):
    """A reply request goes to the LLM even when confident; e-mails are redacted upstream."""
    server.answerer = answering("positive", text="Thanks, we wrote to [EMAIL_1].")
    cascade = cascade_for(server)
    text = "Loved it! Write to me at jane.doe@example.com please."
    decision = cascade.decide([Message(text=text, task=Task.REPLY)])[0]
    assert (decision.tier, decision.reason) == (Tier.LLM, Reason.TASK_NEEDS_GENERATION)
    assert decision.text == "Thanks, we wrote to jane.doe@example.com."
    sent = str(server.requests[0].body)
    assert "jane.doe@example.com" not in sent
    assert "[EMAIL_1]" in sent


def test_calls_per_minute_budget_is_never_overspent_by_concurrent_workers(server, redis_prefix):
    """Two cascades, eight threads, 24 distinct escalations, 5 calls a minute: 5 LLM calls."""
    spec = policy(budget=BudgetSpec(calls_per_minute=5))
    scores = {f"hard {i}": UNSURE for i in range(24)}
    workers = [cascade_for(server, spec, redis_prefix=redis_prefix, scores=scores) for _ in "ab"]

    def one(i: int):
        return workers[i % 2].decide([Message(id=str(i), text=f"hard {i}")])[0]

    with ThreadPoolExecutor(max_workers=8) as pool:
        decisions = list(pool.map(one, range(24)))
    assert server.calls == 5
    assert sum(d.tier is Tier.LLM for d in decisions) == 5
    flagged = [d for d in decisions if d.tier is Tier.BERT]
    assert len(flagged) == 19
    assert {d.llm_skipped for d in flagged} == {LLMSkip.BUDGET_EXHAUSTED}


def test_multi_label_sends_only_borderline_labels_and_merges_the_verdict(server):
    """The LLM is asked about the borderline label only; confident flags keep BERT's verdict."""
    spec = policy(multi_label=True, escalation=Escalation(band=Band(low=0.3, high=0.7)))
    server.answerer = lambda body: {"labels": ["positive"] if message_of(body) == "a" else []}
    cascade = cascade_for(
        server,
        spec,
        scores={"a": (0.95, 0.5, 0.01), "b": (0.95, 0.5, 0.02)},
        multi_label=True,
    )
    yes, no = cascade.decide([Message(text="a"), Message(text="b")])
    assert (yes.tier, yes.reason, yes.labels) == (
        Tier.LLM,
        Reason.UNCERTAIN_LABELS,
        ["negative", "positive"],
    )
    assert no.labels == ["negative"]
    schema = server.requests[0].body["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["labels"]["items"]["enum"] == ["positive"]


def test_a_mixed_batch_answers_every_message_once_in_order(server, redis_prefix):
    """Confident, routed, repeated and failing messages: one decision each, in input order."""
    server.answerer = answering("positive")
    cascade = cascade_for(
        server, redis_prefix=redis_prefix, scores={"hard": UNSURE, "other hard": UNSURE}
    )
    cascade.decide([Message(text="hard")])
    messages = [
        Message(id="1", text="easy"),
        Message(id="2", text="hard"),
        Message(id="3", text="other hard"),
        Message(id="4", text="easy"),
        Message(id="5", text="other hard"),
    ]
    decisions = cascade.decide(messages)
    assert [d.id for d in decisions] == ["1", "2", "3", "4", "5"]
    assert [d.tier for d in decisions] == [Tier.BERT, Tier.LLM, Tier.LLM, Tier.BERT, Tier.LLM]
    assert decisions[1].cached
    assert server.calls == 2


def test_an_open_breaker_spends_no_budget_and_its_probe_answers_after_recovery(
    server, redis_prefix
):
    """Messages met by an open breaker reserve no budget; once half-open, the LLM answers."""
    spec = policy(budget=BudgetSpec(calls_per_minute=5))
    client = redis.Redis(host="127.0.0.1", port=6379)
    budget = RedisBudgetLedger(client, redis_prefix, clock=lambda: BUDGET_NOW)
    clock = Clock()
    tier = LLMTier(
        settings_for(server, breaker_failures=1, breaker_reset_s=30),
        breaker_store=RedisBreakerStore(client, redis_prefix),
        breaker_clock=clock,
    )
    cascade = Cascade(
        FixedScoreClassifier(LABELS, {}, default=UNSURE),
        PolicyBook([spec]),
        llm=tier,
        cache=RedisDecisionCache(client, redis_prefix),
        budget=budget,
    )
    server.answerer = answering("synopsis")
    tier.breaker.record_failure("openai:gpt-4o-mini")
    outage = cascade.decide([Message(id=str(i), text=f"hard {i}") for i in range(8)])
    assert {(d.tier, d.llm_skipped) for d in outage} == {(Tier.BERT, LLMSkip.LLM_UNAVAILABLE)}
    assert all("circuit breaker open" in (d.llm_error or "") for d in outage)
    assert budget.state(spec.name, spec.budget).calls_left == 5
    assert server.calls == 0
    clock.now += 30  # the breaker is half-open: checking must leave its probe for the call
    recovered = cascade.decide([Message(id="r", text="hard 0")])[0]
    assert (recovered.tier, recovered.label, recovered.llm_skipped) == (
        Tier.LLM,
        "synopsis",
        None,
    )
    assert budget.state(spec.name, spec.budget).calls_left == 4
    assert server.calls == 1
    client.close()
