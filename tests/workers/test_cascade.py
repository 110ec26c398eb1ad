"""The cascade: cache, BERT tier, policy and LLM tier in one pass, with real Redis and HTTP."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import redis
from structlog.testing import capture_logs

from tiergate.policies.routing import BudgetState, Reason
from tiergate.policies.spec import (
    EXAMPLES,
    BudgetSpec,
    Escalation,
    LabelSpec,
    PolicySpec,
    Task,
    WhenExhausted,
    example_policy,
)
from tiergate.workers.budget import LocalBudgetLedger, RedisBudgetLedger
from tiergate.workers.cache import RedisDecisionCache, SqliteDecisionCache
from tiergate.workers.cascade import Cascade, PolicyBook, check_policy_fits_model, load_policy_book
from tiergate.workers.errors import UnknownPolicyError
from tiergate.workers.schemas import Decision, LLMSkip, Message, Status, Tier
from tiergate.workers.settings import Settings
from tiergate.workers.testing import FixedScoreClassifier

LABELS = ("negative", "positive", "synopsis")
CONFIDENT = (0.95, 0.03, 0.02)
UNSURE = (0.4, 0.35, 0.25)


def policy(**changes) -> PolicySpec:
    """The films policy (escalates below 0.8), with ``changes`` applied."""
    spec = PolicySpec(
        name="films",
        version="1",
        labels=[LabelSpec(name=n, description=f"a {n} snippet") for n in LABELS],
        escalation=Escalation(min_probability=0.8),
    )
    return spec.model_copy(update=changes)


def classifier(**scores) -> FixedScoreClassifier:
    """A classifier that is confident about every text except those given scores."""
    return FixedScoreClassifier(LABELS, dict(scores.items()), default=CONFIDENT)


class CountingBudgetLedger(RedisBudgetLedger):
    """The Redis budget ledger, noting the policy of every budget read."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        super().__init__(client, prefix)
        self.reads: list[str] = []

    def state(self, policy: str, spec: BudgetSpec) -> BudgetState:
        self.reads.append(policy)
        return super().state(policy, spec)


class CountingCache(SqliteDecisionCache):
    """The SQLite cache, noting the keys of every put_many call."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.batches: list[list[str]] = []

    def put_many(self, entries: Sequence[tuple[str, Decision, int]]) -> None:
        self.batches.append([key for key, _, _ in entries])
        super().put_many(entries)


def test_confident_messages_are_answered_by_bert_in_input_order():
    """Every message gets one decision, in order, with the policy's name and version."""
    cascade = Cascade(classifier(), PolicyBook([policy()]))
    messages = [Message(id=f"m{i}", text=f"text {i}") for i in range(5)]
    decisions = cascade.decide(messages)
    assert [d.id for d in decisions] == [m.id for m in messages]
    assert all(d.tier is Tier.BERT and d.reason is Reason.CONFIDENT for d in decisions)
    assert {(d.policy, d.policy_version) for d in decisions} == {("films", "1")}
    assert all("bert" in d.timings_ms and "total" in d.timings_ms for d in decisions)


def test_routed_message_without_llm_says_the_step_was_skipped():
    """With no LLM tier, a low-confidence message gets the BERT answer and llm_skipped."""
    cascade = Cascade(classifier(hard=UNSURE), PolicyBook([policy()]))
    easy, hard = cascade.decide([Message(text="easy"), Message(text="hard")])
    assert (easy.tier, easy.llm_skipped) == (Tier.BERT, None)
    assert (hard.tier, hard.reason, hard.llm_skipped) == (
        Tier.BERT,
        Reason.LOW_CONFIDENCE,
        LLMSkip.NO_PROVIDER,
    )
    assert hard.label == "negative"


def test_unknown_policy_is_refused_before_any_work():
    """A message naming a policy that is not loaded raises, and the BERT tier is not run."""
    scorer = classifier()
    cascade = Cascade(scorer, PolicyBook([policy()]))
    with pytest.raises(UnknownPolicyError, match="films"):
        cascade.decide([Message(text="a"), Message(text="b", policy="nope")])
    assert scorer.calls == 0


def test_default_policy_answers_to_its_name_and_to_default():
    """Messages may name the policy or leave the default; both resolve to the same spec."""
    cascade = Cascade(classifier(), PolicyBook([policy(), policy(name="other")]))
    named, default, other = cascade.decide(
        [Message(text="a", policy="films"), Message(text="a"), Message(text="a", policy="other")]
    )
    assert named.policy == default.policy == "films"
    assert other.policy == "other"


@pytest.mark.parametrize("backend", ["redis", "sqlite"])
def test_repeated_message_is_answered_from_the_cache(backend, redis_prefix, tmp_path):
    """A second identical message (after normalisation) is a hit and skips the BERT tier."""
    cache = (
        RedisDecisionCache(redis.Redis(host="127.0.0.1", port=6379), redis_prefix)
        if backend == "redis"
        else SqliteDecisionCache(tmp_path / "cache.sqlite3")
    )
    scorer = classifier()
    cascade = Cascade(scorer, PolicyBook([policy()]), cache=cache)
    first = cascade.decide([Message(id="a", text="A  fine   film.", metadata={"n": 1})])[0]
    second = cascade.decide([Message(id="b", text=" A fine film. ", metadata={"n": 2})])[0]
    assert (first.cached, second.cached) == (False, True)
    assert (second.id, second.metadata, second.tier) == ("b", {"n": 2}, Tier.BERT)
    assert second.label == first.label
    assert scorer.texts_scored == 1
    assert "bert" not in second.timings_ms
    cache.close()


def test_cache_key_changes_with_policy_version_and_task():
    """A new policy version or another task is never served an old decision."""
    cascade = Cascade(classifier(), PolicyBook([policy()]))
    message = Message(text="same")
    base = cascade.cache_key(message, policy())
    assert base != cascade.cache_key(message, policy(version="2"))
    assert base != cascade.cache_key(Message(text="same", task=Task.REPLY), policy())
    assert "same" not in base


def test_skipped_llm_fallbacks_are_not_cached(tmp_path):
    """A BERT answer given because the LLM was unavailable is recomputed next time."""
    cache = SqliteDecisionCache(tmp_path / "cache.sqlite3")
    scorer = classifier(hard=UNSURE)
    cascade = Cascade(scorer, PolicyBook([policy()]), cache=cache)
    cascade.decide([Message(text="hard")])
    again = cascade.decide([Message(text="hard")])[0]
    assert (again.cached, again.llm_skipped) == (False, LLMSkip.NO_PROVIDER)
    assert scorer.texts_scored == 2
    cache.close()


def test_spent_budget_defers_or_flags_as_the_policy_says(redis_prefix):
    """With usd_per_day 0 a routed message is deferred (defer) or flagged (bert)."""
    ledger = RedisBudgetLedger(redis.Redis(host="127.0.0.1", port=6379), redis_prefix)
    spent = BudgetSpec(usd_per_day=0.0, when_exhausted=WhenExhausted.DEFER)
    deferring = policy(name="deferring", budget=spent)
    flagging = policy(
        name="flagging", budget=spent.model_copy(update={"when_exhausted": WhenExhausted.BERT})
    )
    cascade = Cascade(classifier(hard=UNSURE), PolicyBook([deferring, flagging]), budget=ledger)
    deferred, flagged, easy = cascade.decide(
        [
            Message(text="hard", policy="deferring"),
            Message(text="hard", policy="flagging"),
            Message(text="easy", policy="deferring"),
        ]
    )
    assert (deferred.status, deferred.llm_skipped) == (Status.DEFERRED, LLMSkip.BUDGET_EXHAUSTED)
    assert (flagged.status, flagged.llm_skipped) == (Status.ANSWERED, LLMSkip.BUDGET_EXHAUSTED)
    assert (easy.status, easy.llm_skipped) == (Status.ANSWERED, None)


def test_confident_messages_do_not_read_the_budget(redis_prefix):
    """A batch BERT answers confidently never reads the budget, even a spent one."""
    ledger = CountingBudgetLedger(redis.Redis(host="127.0.0.1", port=6379), redis_prefix)
    spent = policy(budget=BudgetSpec(usd_per_day=0.0))
    cascade = Cascade(classifier(), PolicyBook([spent]), budget=ledger)
    decisions = cascade.decide([Message(text=f"easy {i}") for i in range(5)])
    assert ledger.reads == []
    assert {(d.status, d.llm_skipped) for d in decisions} == {(Status.ANSWERED, None)}


def test_escalating_messages_read_the_budget_once_per_policy(redis_prefix):
    """Each policy's budget is read once if a message of it escalates, else never."""
    ledger = CountingBudgetLedger(redis.Redis(host="127.0.0.1", port=6379), redis_prefix)
    spent = policy(budget=BudgetSpec(usd_per_day=0.0, when_exhausted=WhenExhausted.BERT))
    book = PolicyBook([spent, policy(name="open"), policy(name="calm")])
    cascade = Cascade(classifier(hard=UNSURE), book, budget=ledger)
    names = ["films", "open", "films", "open", "films"]
    decisions = cascade.decide(
        [Message(text="hard", policy=name) for name in names]
        + [Message(text="easy", policy="calm")]
    )
    assert sorted(ledger.reads) == ["films", "open"]
    assert [d.llm_skipped for d in decisions] == [
        LLMSkip.BUDGET_EXHAUSTED,
        LLMSkip.NO_PROVIDER,
        LLMSkip.BUDGET_EXHAUSTED,
        LLMSkip.NO_PROVIDER,
        LLMSkip.BUDGET_EXHAUSTED,
        None,
    ]


def test_a_batch_is_cached_in_one_put_many(tmp_path):
    """The final BERT decisions of a batch go to the cache in one call; fallbacks stay out."""
    cache = CountingCache(tmp_path / "cache.sqlite3")
    scorer = classifier(hard=UNSURE)
    cascade = Cascade(scorer, PolicyBook([policy()]), cache=cache)
    texts = ["one", "hard", "two", "three"]
    cascade.decide([Message(text=text) for text in texts])
    assert [len(keys) for keys in cache.batches] == [3]
    again = cascade.decide([Message(text=text) for text in texts])
    assert [d.cached for d in again] == [True, False, True, True]
    assert scorer.texts_scored == 5
    cache.close()


def test_fixed_score_classifier_calls_texts_over_1000_characters_long():
    """The shipped test double's is_long: more than 1,000 characters."""
    scorer = classifier()
    assert not scorer.is_long("x" * 1000)
    assert scorer.is_long("x" * 1001)


def test_policy_book_for_the_default_model_is_the_shipped_policy(tmp_path):
    """Without policy files, a model with the default labels gets the rotten-tomatoes policy."""
    book = load_policy_book(Settings(data_dir=tmp_path), LABELS, multi_label=False)
    assert book.default.name == "rotten-tomatoes"
    other = load_policy_book(Settings(data_dir=tmp_path), ("x", "y"), multi_label=False)
    assert other.default.escalation.min_probability == 0.0


def test_policy_that_does_not_fit_the_model_is_refused(tmp_path: Path):
    """A policy with other labels, or another head, names the mismatch."""
    from tiergate.policies.spec import PolicyError

    with pytest.raises(PolicyError, match=r"missing \['positive'\]"):
        check_policy_fits_model(
            policy(labels=[LabelSpec(name="negative"), LabelSpec(name="synopsis")]),
            LABELS,
            multi_label=False,
        )
    with pytest.raises(PolicyError, match="multi-label head"):
        check_policy_fits_model(policy(), LABELS, multi_label=True)
    path = tmp_path / "p.yaml"
    path.write_text(policy(name="custom").to_yaml())
    book = load_policy_book(
        Settings(data_dir=tmp_path, policy_files=[path]), LABELS, multi_label=False
    )
    assert book.names == ("custom",)


def test_a_policy_without_a_provider_is_a_warning_when_loaded(tmp_path: Path):
    """Loading a policy with an empty provider chain logs policy.no_provider naming it."""
    path = tmp_path / "bare.yaml"
    path.write_text(policy(name="bare").to_yaml())
    settings = Settings(data_dir=tmp_path, policy_files=[path])
    with capture_logs() as logs:
        load_policy_book(settings, LABELS, multi_label=False)
    warnings = [entry for entry in logs if entry["event"] == "policy.no_provider"]
    assert [(w["log_level"], w["policy"]) for w in warnings] == [("warning", "bare")]
    assert "llm_skipped: no_provider" in warnings[0]["advice"]
    assert "llm.providers" in warnings[0]["advice"]
    called: list[str] = []
    load_policy_book(
        settings, LABELS, multi_label=False, on_no_provider=lambda spec: called.append(spec.name)
    )
    assert called == ["bare"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_the_shipped_policies_load_without_a_provider_warning(tmp_path: Path, name):
    """Each shipped policy has a provider chain, so loading it warns of nothing."""
    spec = example_policy(name)
    path = tmp_path / f"{name}.yaml"
    path.write_text(spec.to_yaml())
    with capture_logs() as logs:
        load_policy_book(
            Settings(data_dir=tmp_path, policy_files=[path]),
            spec.label_names,
            multi_label=spec.multi_label,
        )
    assert [entry for entry in logs if entry["event"] == "policy.no_provider"] == []


def test_local_ledger_counts_only_llm_routes():
    """Confident messages never touch the budget; the ledger reports nothing spent."""
    ledger = LocalBudgetLedger()
    spec = policy(budget=BudgetSpec(calls_per_minute=1))
    cascade = Cascade(classifier(), PolicyBook([spec]), budget=ledger)
    cascade.decide([Message(text=f"t{i}") for i in range(10)])
    assert ledger.state("films", spec.budget).calls_left == 1
