"""The cascade: the one code path that turns messages into decisions, wherever it runs.

The CLI, the HTTP gateway (embedded mode) and the Celery workers all call
:meth:`Cascade.decide` with a batch of messages:

1. one decision-cache lookup for the whole batch;
2. the BERT tier on the misses, in one batch;
3. ``policies.decide`` per message, with the policy's budget state;
4. the LLM tier for the messages routed to it, with bounded concurrency, single-flight per
   cache key (many identical messages cause one LLM call, across processes when the cache is
   shared) and a budget reservation before each call, settled with the real cost afterwards
   (no reservation while every provider's circuit breaker is open: no call would be made);
5. cache writes for final decisions; decisions come back in input order with per-step timings.

When the policy wants the LLM but cannot have it (no provider configured, budget spent, every
provider failing, an invalid answer), the BERT answer is given and the decision says why in
``llm_skipped``; nothing is dropped. Such fallbacks are not cached, so the message gets the
LLM's answer once the LLM is back. Every call made is paid for: a decision's ``llm`` block and
the budget's settlement count the calls made for it whatever their outcome, and a decision that
reuses an answer (a cache hit, a duplicate in the batch) carries an unpaid one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import structlog
from pydantic import BaseModel, ConfigDict, Field

from tiergate.policies.routing import (
    UNLIMITED,
    BudgetState,
    Reason,
    Route,
    Target,
    decide,
    in_audit_sample,
)
from tiergate.policies.spec import (
    EXAMPLES,
    CallMode,
    PolicyError,
    PolicySpec,
    WhenExhausted,
    example_policy,
    load_policy,
)
from tiergate.workers.bert.calibrated import ModelThresholds
from tiergate.workers.budget import BudgetLedger, open_budget_ledger
from tiergate.workers.cache import DecisionCache, cache_key, open_cache
from tiergate.workers.errors import (
    BreakerOpenError,
    LLMError,
    PermanentLLMError,
    SingleFlightTimeout,
    UnknownPolicyError,
)
from tiergate.workers.labels import LabelStore, Observed, open_label_store
from tiergate.workers.llm.breaker import LocalBreakerStore, RedisBreakerStore
from tiergate.workers.llm.tier import LLMRequest, LLMResult, LLMTier
from tiergate.workers.redis_connection import shared_redis
from tiergate.workers.schemas import (
    Decision,
    LLMSkip,
    LLMUsage,
    Message,
    Prediction,
    Status,
    Tier,
)
from tiergate.workers.settings import Settings

if TYPE_CHECKING:
    from tiergate.workers.bert.classifier import BertClassifier
    from tiergate.workers.bert.serving import ServingClassifier

log = structlog.get_logger(__name__)

DEFAULT_POLICY = "default"
NO_LLM_ROUTE = "none"


class Classifier(Protocol):
    """A tier that scores texts: one calibrated prediction per text, in input order."""

    @property
    def model_version(self) -> str:
        """The version of the model behind the scores (part of every cache key)."""
        ...

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        """Score ``texts``; raise :class:`~tiergate.workers.errors.InputError` for bad text."""
        ...

    def is_long(self, text: str) -> bool:
        """Whether scoring ``text`` takes more than one model window.

        Such a text costs several times what a short one does. Cheap enough to ask on the
        event loop.
        """
        ...


@runtime_checkable
class SwitchingClassifier(Classifier, Protocol):
    """A classifier whose model may change between batches (a promotion, a rollback).

    The cascade takes one snapshot per batch with :meth:`for_batch` and uses it for the batch's
    cache keys and predictions, so a batch runs on one model and every decision names it.
    """

    def for_batch(self) -> Classifier:
        """The classifier for one whole batch (it may first switch to a new version)."""
        ...

    def shadow_scorer(self) -> ShadowScorer | None:
        """The hook that scores live traffic with a shadow candidate (``None``: none)."""
        ...


class ShadowScorer(Protocol):
    """Scores batches with a candidate model beside the live one; never changes a decision."""

    def observe_first_pass(
        self,
        messages: Sequence[Message],
        specs: Sequence[PolicySpec],
        indices: Sequence[int],
        results: list[Decision | LLMWork | None],
    ) -> None:
        """After the BERT step: score ``messages[i]`` for ``i`` in ``indices``.

        It may replace an :class:`LLMWork` in ``results`` by a copy carrying the candidate's
        prediction in ``shadow``; nothing else.
        """
        ...

    def observe_answer(self, work: LLMWork, decision: Decision, spec: PolicySpec) -> None:
        """After the LLM step: compare the candidate's prediction in ``work`` with ``decision``."""
        ...


class PolicyBook:
    """The policies one process serves, by name; one of them also answers to ``default``."""

    def __init__(self, policies: Iterable[PolicySpec], default: str | None = None) -> None:
        self._by_name: dict[str, PolicySpec] = {}
        for spec in policies:
            self._by_name[spec.name] = spec
        if not self._by_name:
            raise ValueError("a policy book needs at least one policy")
        first = next(iter(self._by_name))
        self.default = self._by_name[default if default is not None else first]

    def get(self, name: str) -> PolicySpec:
        """The policy called ``name`` (``default`` is the default one)."""
        if name == DEFAULT_POLICY:
            return self.default
        spec = self._by_name.get(name)
        if spec is None:
            raise UnknownPolicyError(name, self.names)
        return spec

    @property
    def names(self) -> tuple[str, ...]:
        """Every loaded policy's name."""
        return tuple(self._by_name)

    def __iter__(self) -> Iterator[PolicySpec]:
        return iter(self._by_name.values())


class LLMWork(BaseModel):
    """A message the policy sent to the LLM: the hand-off from the BERT step to the LLM step.

    It is plain JSON (``model_dump_json``), so a BERT worker can pass it to an LLM worker on
    another machine through the broker. ``policy`` is the policy's name; ``key`` the decision
    cache key; ``timings_ms`` what the first step spent; ``shadow`` the shadow candidate's
    prediction, when one is being evaluated (the LLM step compares it with the LLM's answer).
    """

    model_config = ConfigDict(frozen=True)

    message: Message
    prediction: Prediction
    policy: str
    reason: Reason
    labels: tuple[str, ...] = ()
    key: str
    timings_ms: dict[str, float] = Field(default_factory=dict)
    shadow: Prediction | None = None

    @property
    def route(self) -> Route:
        """The route that sent this message to the LLM."""
        return Route(Target.LLM, self.reason, self.labels)


class Cascade:
    """Decides batches of messages with the tiers it holds.

    ``llm``, ``cache`` and ``budget`` are optional: without an LLM tier routed messages get the
    BERT answer marked ``llm_skipped: no_provider``; without a cache nothing is reused; without
    a ledger the budget is unlimited. With a ``labels`` store, every decision of a policy that
    collects labels is recorded there (:meth:`LabelStore.record`, which never raises). Safe to
    share between threads.

    :meth:`decide` runs both steps in one process. Distributed workers run them apart:
    :meth:`first_pass` (cache, BERT tier, policy) on a BERT worker, and :meth:`answer` (the
    LLM step) on an LLM worker for each :class:`LLMWork` the first step hands over.
    """

    def __init__(
        self,
        classifier: Classifier,
        policies: PolicyBook,
        *,
        llm: LLMTier | None = None,
        cache: DecisionCache | None = None,
        budget: BudgetLedger | None = None,
        llm_concurrency: int = 8,
        single_flight_timeout_s: float = 60.0,
        labels: LabelStore | None = None,
        shadow: ShadowScorer | None = None,
        thresholds: ModelThresholds | None = None,
    ) -> None:
        self.thresholds = thresholds
        self.labels = labels
        self.shadow = shadow
        self.classifier = classifier
        self.policies = policies
        self.llm = llm
        self.cache = cache
        self.budget = budget
        self.llm_concurrency = llm_concurrency
        self.single_flight_timeout_s = single_flight_timeout_s

    def cache_key(self, message: Message, spec: PolicySpec) -> str:
        """The decision-cache key of ``message`` under ``spec`` (never contains the text)."""
        return self._cache_key(message, spec, self._llm_route(spec), self.classifier.model_version)

    def _spec(self, policy: str, model_version: str) -> PolicySpec:
        """The policy called ``policy`` as served with ``model_version``.

        With the thresholds that version brings for it, if any (see
        :class:`~tiergate.workers.bert.calibrated.ModelThresholds`), else as configured.
        """
        spec = self.policies.get(policy)
        return self.thresholds.spec(spec, model_version) if self.thresholds is not None else spec

    def _llm_route(self, spec: PolicySpec) -> str:
        """The provider chain part of ``spec``'s cache keys (the same for all its messages)."""
        return self.llm.route_key(spec) if self.llm is not None else NO_LLM_ROUTE

    def _cache_key(
        self, message: Message, spec: PolicySpec, llm_route: str, model_version: str
    ) -> str:
        return cache_key(
            message.text,
            policy=spec.name,
            policy_version=spec.version,
            model_version=model_version,
            llm_route=llm_route,
            prompt_version=self.llm.prompt_version if self.llm is not None else NO_LLM_ROUTE,
            task=message.task.value,
        )

    def decide(self, messages: Sequence[Message]) -> list[Decision]:
        """One decision per message, in input order: both steps in this process.

        Raises :class:`~tiergate.workers.errors.UnknownPolicyError` (before any work) when a message
        names a policy that is not loaded, and :class:`~tiergate.workers.errors.CoordinationError`
        when the shared cache or budget store is unreachable.
        """
        if not messages:
            return []
        started = time.perf_counter()
        first = self.first_pass(messages)
        answered = iter(self.answer_many([item for item in first if isinstance(item, LLMWork)]))
        merged = [next(answered) if isinstance(item, LLMWork) else item for item in first]
        total = _ms(started)
        return [
            d.model_copy(update={"timings_ms": {**d.timings_ms, "total": total}}) for d in merged
        ]

    def first_pass(self, messages: Sequence[Message]) -> list[Decision | LLMWork]:
        """The BERT step: per message, its decision, or the :class:`LLMWork` for the LLM step.

        One cache lookup for the batch, the BERT tier on the misses in one batch, the policy
        per message; final BERT decisions are cached. Same errors as :meth:`decide`.
        """
        if not messages:
            return []
        # One model for the whole batch, keys, thresholds and predictions alike, even if a new
        # version is promoted meanwhile: the next batch gets it.
        classifier = (
            self.classifier.for_batch()
            if isinstance(self.classifier, SwitchingClassifier)
            else self.classifier
        )
        version = classifier.model_version
        specs = [self._spec(m.policy, version) for m in messages]
        routes = {spec.name: self._llm_route(spec) for spec in specs}  # once per policy
        keys = [
            self._cache_key(m, s, routes[s.name], version)
            for m, s in zip(messages, specs, strict=True)
        ]
        results: list[Decision | LLMWork | None] = [None] * len(messages)

        lookup_ms = 0.0
        if self.cache is not None:
            cache_started = time.perf_counter()
            hits = self.cache.get_many(keys)
            lookup_ms = _ms(cache_started)
            for i, hit in enumerate(hits):
                if hit is not None:
                    results[i] = _from_cache(hit, messages[i], lookup_ms)

        misses = [i for i, d in enumerate(results) if d is None]
        if misses:
            bert_started = time.perf_counter()
            predictions = classifier.predict([messages[i].text for i in misses])
            bert_ms = _ms(bert_started)
            timings = {"cache": lookup_ms, "bert": bert_ms} if self.cache else {"bert": bert_ms}
            self._route(misses, messages, specs, keys, predictions, timings, results)
            self._store(misses, keys, specs, results)
            if self.shadow is not None:  # after the live step: no decision waits for it
                self.shadow.observe_first_pass(messages, specs, misses, results)
        self._collect(
            Observed(messages[i], keys[i], r, specs[i])
            for i, r in enumerate(results)
            if isinstance(r, Decision)
        )
        return [r for r in results if r is not None]

    def _collect(self, observed: Iterable[Observed]) -> None:
        """Hand decisions to the label store, if there is one (it keeps opted-in policies')."""
        if self.labels is not None:
            self.labels.record(list(observed))

    def answer(self, work: LLMWork) -> Decision:
        """The LLM step for one message (:meth:`_answer`), its decision handed to the labels."""
        decision = self._answer(work)
        spec = self._spec(work.policy, work.prediction.model_version)
        if self.shadow is not None:
            self.shadow.observe_answer(work, decision, spec)
        self._collect([Observed(work.message, work.key, decision, spec)])
        return decision

    def _answer(self, work: LLMWork) -> Decision:
        """The LLM step for one message: from another worker's call, or from our own.

        Waits on the single-flight lease of its cache key, checks that some provider's breaker
        would let the call out, reserves the budget, asks the LLM tier, settles the budget and
        caches the answer. An LLM that cannot answer gives the BERT answer with ``llm_skipped``
        saying why (not cached); with every breaker open that is ``llm_unavailable``, and no
        budget is reserved.
        """
        spec = self._spec(work.policy, work.prediction.model_version)
        lease = None
        # With caching off for this policy there is no shared result to wait for.
        if self.cache is not None and spec.cache.ttl_seconds > 0:
            try:
                waited = self.cache.wait(work.key, self.single_flight_timeout_s)
            except SingleFlightTimeout as exc:
                return _fallback(work, spec, LLMSkip.LLM_UNAVAILABLE, str(exc))
            if isinstance(waited, Decision):
                return _from_cache(waited, work.message, work.timings_ms.get("cache", 0.0))
            lease = waited
        try:
            decision = self._call_llm(work, spec)
            if self.cache is not None and decision.llm_skipped is None:
                self.cache.put(work.key, decision, spec.cache.ttl_seconds)
            return decision
        finally:
            if lease is not None:
                lease.release()

    def pending(self, work: LLMWork) -> Decision:
        """The BERT answer for ``work`` while its LLM answer waits in a batch (``pending_llm``)."""
        spec = self._spec(work.policy, work.prediction.model_version)
        return _bert_decision(
            work.message, spec, work.prediction, work.route, work.timings_ms, None
        ).model_copy(update={"status": Status.PENDING_LLM})

    def cached_answer(self, work: LLMWork) -> Decision | None:
        """The cached decision for ``work``'s key, as its message's (``None``: not cached)."""
        if self.cache is None:
            return None
        hit = self.cache.get_many([work.key])[0]
        return _from_cache(hit, work.message, 0.0) if hit is not None else None

    def budget_fallback(self, work: LLMWork) -> Decision:
        """The policy's answer for ``work`` when its budget is spent (deferred, or BERT's)."""
        return _budget_fallback(work, self._spec(work.policy, work.prediction.model_version))

    def batch_answer(self, work: LLMWork, outcome: LLMResult | LLMError) -> Decision:
        """The final decision for ``work`` from its batch's answer, or from the answer's error.

        An answer is cached under ``work.key`` and recorded like an online one (labels,
        shadow); an error (a refusal, an invalid answer) gives the BERT answer with
        ``llm_skipped: invalid_answer`` and what the call cost, not cached.
        """
        spec = self._spec(work.policy, work.prediction.model_version)
        if isinstance(outcome, LLMError):
            decision = _fallback(work, spec, LLMSkip.INVALID_ANSWER, str(outcome), outcome.usage)
        else:
            decision = _llm_decision(work, spec, outcome, dict(work.timings_ms))
            if self.cache is not None and spec.cache.ttl_seconds > 0:
                self.cache.put(work.key, decision, spec.cache.ttl_seconds)
        if self.shadow is not None:
            self.shadow.observe_answer(work, decision, spec)
        self._collect([Observed(work.message, work.key, decision, spec)])
        return decision

    # ------------------------------------------------------------------------------ steps

    def _route(
        self,
        misses: Sequence[int],
        messages: Sequence[Message],
        specs: Sequence[PolicySpec],
        keys: Sequence[str],
        predictions: Sequence[Prediction],
        timings: Mapping[str, float],
        results: list[Decision | LLMWork | None],
    ) -> None:
        """Apply each message's policy; answer what the BERT tier may answer, hand on the rest.

        The budget is read (once per policy) only for a message that would go to the LLM: a
        confident BERT answer does not depend on it.
        """
        states: dict[str, BudgetState] = {}
        for i, prediction in zip(misses, predictions, strict=True):
            message, spec = messages[i], specs[i]
            audited = in_audit_sample(keys[i], spec.learning.audit_share)
            route = decide(prediction, spec, UNLIMITED, message.task, audited)
            if route.target is not Target.BERT and self.budget is not None:
                if spec.name not in states:
                    states[spec.name] = self.budget.state(spec.name, spec.budget)
                route = decide(prediction, spec, states[spec.name], message.task, audited)
            if route.target is Target.BERT:
                skipped = LLMSkip.BUDGET_EXHAUSTED if route.budget_exhausted else None
                results[i] = _bert_decision(message, spec, prediction, route, timings, skipped)
            elif route.target is Target.DEFER:
                results[i] = _bert_decision(
                    message, spec, prediction, route, timings, LLMSkip.BUDGET_EXHAUSTED
                ).model_copy(update={"status": Status.DEFERRED})
            elif self.llm is None or not self.llm.configured(spec):
                results[i] = _bert_decision(
                    message, spec, prediction, route, timings, LLMSkip.NO_PROVIDER
                )
            else:
                results[i] = LLMWork(
                    message=message,
                    prediction=prediction,
                    policy=spec.name,
                    reason=route.reason,
                    labels=route.labels,
                    key=keys[i],
                    timings_ms=dict(timings),
                )

    def answer_many(self, work: Sequence[LLMWork]) -> list[Decision]:
        """Answer each work item, asking the LLM once per distinct cache key, in parallel.

        Items sharing a key share the first one's answer; only the first carries what the
        calls cost, the others an unpaid ``llm`` block (:meth:`LLMUsage.unpaid`).
        """
        if not work:
            return []
        by_key: dict[str, list[LLMWork]] = {}
        for item in work:
            by_key.setdefault(item.key, []).append(item)
        workers = min(self.llm_concurrency, len(by_key))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tiergate-llm") as pool:
            firsts = [group[0] for group in by_key.values()]
            answers = dict(zip(by_key, pool.map(self.answer, firsts), strict=True))
        decisions = []
        seen: set[str] = set()
        for item in work:
            answer = answers[item.key]
            update: dict[str, object] = {
                "id": item.message.id,
                "metadata": dict(item.message.metadata),
            }
            if item.key in seen and answer.llm is not None:
                update["llm"] = answer.llm.unpaid()
            duplicate = item.key in seen
            seen.add(item.key)
            decisions.append(answer.model_copy(update=update))
            if duplicate:  # the first of each key was recorded by answer()
                spec = self._spec(item.policy, item.prediction.model_version)
                self._collect([Observed(item.message, item.key, decisions[-1], spec)])
        return decisions

    def _call_llm(self, work: LLMWork, spec: PolicySpec) -> Decision:
        llm = self.llm
        if llm is None or not llm.configured(spec):
            return _fallback(work, spec, LLMSkip.NO_PROVIDER, "no LLM provider is configured")
        try:
            # Before reserving: a call every breaker would refuse must not spend the budget.
            llm.check_breakers(spec)
        except BreakerOpenError as exc:
            log.warning("llm.failed", policy=spec.name, message_id=work.message.id, error=str(exc))
            return _fallback(work, spec, LLMSkip.LLM_UNAVAILABLE, str(exc))
        reservation = None
        if self.budget is not None:
            estimate = llm.estimate_cost(spec, work.message.text)
            reservation = self.budget.reserve(spec.name, spec.budget, estimate)
            if reservation is None:
                log.info("budget.exhausted", policy=spec.name, message_id=work.message.id)
                return _budget_fallback(work, spec)
        started = time.perf_counter()
        request = LLMRequest(
            text=work.message.text, spec=spec, task=work.message.task, labels=work.labels
        )
        spent = reservation.usd if reservation is not None else 0.0
        try:
            result = llm.answer(request)
            spent = result.usage.cost_usd
        except LLMError as exc:
            # The calls made for a failed answer are paid all the same (none: nothing to pay).
            spent = exc.usage.cost_usd if exc.usage is not None else 0.0
            skip = (
                LLMSkip.INVALID_ANSWER
                if isinstance(exc, PermanentLLMError)
                else LLMSkip.LLM_UNAVAILABLE
            )
            log.warning("llm.failed", policy=spec.name, message_id=work.message.id, error=str(exc))
            return _fallback(work, spec, skip, str(exc), exc.usage)
        finally:
            if reservation is not None and self.budget is not None:
                self.budget.settle(reservation, spent)
        return _llm_decision(work, spec, result, {**work.timings_ms, "llm": _ms(started)})

    def _store(
        self,
        indices: Sequence[int],
        keys: Sequence[str],
        specs: Sequence[PolicySpec],
        results: Sequence[Decision | LLMWork | None],
    ) -> None:
        """Cache the final BERT decisions (LLM answers are cached under their lease)."""
        if self.cache is None:
            return
        entries = []
        for i in indices:
            decision = results[i]
            if (
                isinstance(decision, Decision)
                and decision.tier is Tier.BERT
                and decision.llm_skipped is None
                and decision.status is Status.ANSWERED
                and not decision.cached
            ):
                entries.append((keys[i], decision, specs[i].cache.ttl_seconds))
        self.cache.put_many(entries)


# ---------------------------------------------------------------------------------- decisions


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 3)


def _bert_labels(prediction: Prediction, spec: PolicySpec) -> tuple[str | None, list[str]]:
    if prediction.multi_label:
        return None, prediction.labels_above(spec.escalation.flag_threshold)
    return prediction.top_label, [prediction.top_label]


def _bert_decision(
    message: Message,
    spec: PolicySpec,
    prediction: Prediction,
    route: Route,
    timings: Mapping[str, float],
    skipped: LLMSkip | None,
) -> Decision:
    label, labels = _bert_labels(prediction, spec)
    return Decision(
        id=message.id,
        label=label,
        labels=labels,
        scores=prediction.scores(),
        tier=Tier.BERT,
        reason=route.reason,
        llm_skipped=skipped,
        chunks=prediction.chunks,
        model_version=prediction.model_version,
        policy=spec.name,
        policy_version=spec.version,
        task=message.task,
        timings_ms=dict(timings),
        metadata=dict(message.metadata),
    )


def _llm_decision(
    work: LLMWork, spec: PolicySpec, result: LLMResult, timings: Mapping[str, float]
) -> Decision:
    prediction = work.prediction
    if prediction.multi_label:
        # The LLM judged only the borderline labels; the confident ones keep the BERT verdict.
        asked = set(work.labels) if work.labels else set(prediction.labels)
        confident = [
            label
            for label in prediction.labels_above(spec.escalation.flag_threshold)
            if label not in asked
        ]
        flagged = set(confident) | (set(result.labels) & asked)
        label, labels = None, [name for name in prediction.labels if name in flagged]
    else:
        label = result.label if result.label is not None else prediction.top_label
        labels = [label]
    return Decision(
        id=work.message.id,
        label=label,
        labels=labels,
        scores=prediction.scores(),
        tier=Tier.LLM,
        reason=work.reason,
        text=result.text,
        chunks=prediction.chunks,
        model_version=prediction.model_version,
        policy=spec.name,
        policy_version=spec.version,
        task=work.message.task,
        llm=result.usage,
        timings_ms=dict(timings),
        metadata=dict(work.message.metadata),
    )


def _fallback(
    work: LLMWork, spec: PolicySpec, skip: LLMSkip, error: str, usage: LLMUsage | None = None
) -> Decision:
    """The BERT answer for a message the LLM step could not answer, saying why.

    ``usage`` is what the calls made for it cost (``None`` when no call was made).
    """
    return _bert_decision(
        work.message, spec, work.prediction, work.route, work.timings_ms, skip
    ).model_copy(update={"llm_error": error, "llm": usage})


def _budget_fallback(work: LLMWork, spec: PolicySpec) -> Decision:
    """The policy's fallback for a budget found spent at reservation time."""
    decision = _bert_decision(
        work.message, spec, work.prediction, work.route, work.timings_ms, LLMSkip.BUDGET_EXHAUSTED
    )
    if spec.budget.when_exhausted is WhenExhausted.DEFER:
        return decision.model_copy(update={"status": Status.DEFERRED})
    return decision


def _from_cache(hit: Decision, message: Message, lookup_ms: float) -> Decision:
    """The cached ``hit`` as the decision for ``message``: nothing is paid for it this time."""
    return hit.model_copy(
        update={
            "id": message.id,
            "metadata": dict(message.metadata),
            "cached": True,
            "llm": hit.llm.unpaid() if hit.llm is not None else None,
            "timings_ms": {"cache": lookup_ms},
        }
    )


# ---------------------------------------------------------------------------------- assembly


def no_provider_warning(spec: PolicySpec) -> str:
    """What a policy with an empty provider chain means for its messages, and how to add one."""
    return (
        f"policy {spec.name!r} (version {spec.version}) has no LLM provider: every message it "
        "routes to the LLM gets the BERT answer marked llm_skipped: no_provider. List providers "
        "under llm.providers (for example {provider: openai, model: gpt-4o-mini}), or write a "
        "policy with `tiergate policy init --model DIR`"
    )


def log_no_provider(spec: PolicySpec) -> None:
    """Log the warning ``policy.no_provider`` for ``spec`` (see :func:`no_provider_warning`)."""
    log.warning(
        "policy.no_provider",
        policy=spec.name,
        policy_version=spec.version,
        advice=no_provider_warning(spec),
    )


def load_policy_book(
    settings: Settings,
    labels: tuple[str, ...],
    *,
    multi_label: bool,
    on_no_provider: Callable[[PolicySpec], None] = log_no_provider,
) -> PolicyBook:
    """The policies a process serves, each checked against the model's label set.

    ``settings.policy_files`` when given (the first is the default); otherwise the shipped
    policy whose labels are the model's (the default model's ``rotten-tomatoes``), or else a
    policy built from the model's labels that lets every BERT answer stand. Each policy with an
    empty provider chain is passed to ``on_no_provider`` (by default the structured warning
    ``policy.no_provider``; the CLI prints a warning line instead). Raises
    :class:`~tiergate.policies.spec.PolicyError` for a policy whose labels or head differ from the
    model.
    """
    if settings.policy_files:
        specs = [load_policy(path) for path in settings.policy_files]
    else:
        shipped = [example_policy(name) for name in EXAMPLES]
        matching = [
            s for s in shipped if set(s.label_names) == set(labels) and s.multi_label == multi_label
        ]
        specs = matching[:1] or [PolicySpec.for_labels(labels, multi_label=multi_label)]
    for spec in specs:
        check_policy_fits_model(spec, labels, multi_label=multi_label)
    for spec in specs:
        if not spec.llm.providers:
            on_no_provider(spec)
    return PolicyBook(specs)


def check_policy_fits_model(
    spec: PolicySpec, labels: tuple[str, ...], *, multi_label: bool
) -> None:
    """Raise :class:`~tiergate.policies.spec.PolicyError` unless ``spec`` fits the model's head."""
    if set(spec.label_names) != set(labels):
        missing = sorted(set(labels) - set(spec.label_names))
        extra = sorted(set(spec.label_names) - set(labels))
        raise PolicyError(
            f"policy {spec.name!r} does not match the model's labels "
            f"(missing {missing}, not in the model {extra})"
        )
    if spec.multi_label != multi_label:
        kind = "multi-label" if multi_label else "single-label"
        raise PolicyError(f"policy {spec.name!r} does not match the model's {kind} head")


def open_cascade(
    settings: Settings,
    classifier: BertClassifier | ServingClassifier | None = None,
    *,
    use_cache: bool = True,
) -> Cascade:
    """The cascade ``settings`` describe, from the model to the LLM tier.

    ``classifier`` defaults to the deployment's current model version, followed between
    batches (:class:`~tiergate.workers.bert.serving.ServingClassifier`); the policies are
    :func:`policy_book_for` it; the cache, budgets and LLM tier are :func:`build_cascade`'s.
    Raises the model's errors when it cannot be loaded and
    :class:`~tiergate.policies.spec.PolicyError` for a policy that does not fit it.
    """
    if classifier is None:
        # Imports ONNX Runtime, which a process that loads no model (the distributed gateway)
        # does without.
        from tiergate.workers.bert.serving import ServingClassifier  # noqa: PLC0415

        classifier = ServingClassifier.from_settings(settings)
    return build_cascade(
        settings, classifier, policy_book_for(settings, classifier), use_cache=use_cache
    )


def policy_book_for(
    settings: Settings, classifier: BertClassifier | ServingClassifier
) -> PolicyBook:
    """The policies ``settings`` configure, checked against ``classifier``'s labels and head."""
    return load_policy_book(
        settings, classifier.labels, multi_label=classifier.manifest.multi_label
    )


def check_batch_mode(settings: Settings, policies: Iterable[PolicySpec]) -> None:
    """Refuse a batch-mode policy (``llm.mode: batch``) outside a distributed deployment.

    Batches are sent and polled by LLM workers and tracked in Redis, so a process without a
    broker and Redis (the CLI, the embedded gateway) cannot serve one. Raises
    :class:`~tiergate.policies.spec.PolicyError` naming the policy and the way out.
    """
    if settings.broker_url and settings.redis_url:
        return
    for spec in policies:
        if spec.llm.mode is CallMode.BATCH:
            raise PolicyError(
                f"policy {spec.name!r} sets llm.mode: batch, which needs a distributed "
                "deployment (TIERGATE_BROKER_URL and TIERGATE_REDIS_URL, with LLM workers "
                "to send the batches); set llm.mode: online to run it here"
            )


def build_cascade(
    settings: Settings,
    classifier: Classifier,
    policies: PolicyBook,
    *,
    use_cache: bool = True,
) -> Cascade:
    """A cascade with the cache, budgets and LLM tier that ``settings`` configure.

    With ``settings.redis_url`` the decision cache, single-flight, budgets and the circuit
    breaker's state live in Redis and are shared by every process; without it the cache is the
    embedded SQLite file and budgets and breaker state are per process. When a policy collects
    labels (``learning.collect``), the label store of :func:`open_label_store` records them.
    """
    check_batch_mode(settings, policies)
    store: LocalBreakerStore | RedisBreakerStore
    if settings.redis_url:
        store = RedisBreakerStore(shared_redis(settings.redis_url), settings.cache_prefix)
    else:
        store = LocalBreakerStore()
    llm = LLMTier(settings, breaker_store=store)
    for spec in policies:
        llm.chain(spec)  # build the SDK clients now, not inside the first batch's timings
    return Cascade(
        classifier,
        policies,
        llm=llm,
        cache=open_cache(settings) if use_cache else None,
        budget=open_budget_ledger(settings),
        llm_concurrency=settings.llm_concurrency,
        single_flight_timeout_s=settings.single_flight_timeout_s,
        labels=open_label_store(settings) if any(s.learning.collect for s in policies) else None,
        thresholds=ModelThresholds(settings.resolved_model_store),
        shadow=(
            classifier.shadow_scorer() if isinstance(classifier, SwitchingClassifier) else None
        ),
    )
