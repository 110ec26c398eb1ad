"""``decide``: the pure function that says, per message, whether the BERT answer stands.

``decide(prediction, spec, budget, task, audited)`` looks only at its arguments, so it is property
tested and gives the same route wherever it runs (a Celery worker, the HTTP gateway, the CLI).
The route names a target (the BERT answer stands, the LLM answers, or the message is deferred),
an enumerated reason, and for multi-label policies the borderline labels the LLM is asked about.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import StrEnum

from tiergate.policies.prediction import Prediction
from tiergate.policies.spec import PolicySpec, Task, WhenExhausted


class Reason(StrEnum):
    """Why a message was routed the way it was.

    ``confident``: the BERT answer clears every threshold. The others say why the LLM was
    wanted, checked in this order: the request asks for generated text
    (``task_needs_generation``); the BERT label is one that always needs a generated answer
    (``label_needs_generation``); the top-1 probability is below the threshold
    (``low_confidence``); the top two are too close (``low_margin``); a multi-label score lies
    in its uncertainty band (``uncertain_labels``). ``audit``: the BERT answer would stand, but
    the message is in the policy's audit sample (``learning.audit_share``), so the LLM answers
    it and its label measures the BERT tier on unbiased traffic.
    """

    CONFIDENT = "confident"
    TASK_NEEDS_GENERATION = "task_needs_generation"
    LABEL_NEEDS_GENERATION = "label_needs_generation"
    LOW_CONFIDENCE = "low_confidence"
    LOW_MARGIN = "low_margin"
    UNCERTAIN_LABELS = "uncertain_labels"
    AUDIT = "audit"


class Target(StrEnum):
    """Where a routed message goes."""

    BERT = "bert"
    LLM = "llm"
    DEFER = "defer"


@dataclass(frozen=True)
class BudgetState:
    """What is left of a policy's LLM budget at decision time (``None``: no limit).

    The cascade reads this from the budget ledger before deciding and reserves atomically
    afterwards, so a route to the LLM may still meet a spent budget under contention; the
    policy's fallback applies there too.
    """

    calls_left: int | None = None
    usd_left: float | None = None

    @property
    def exhausted(self) -> bool:
        """True when either limit is spent."""
        return (self.calls_left is not None and self.calls_left <= 0) or (
            self.usd_left is not None and self.usd_left <= 0.0
        )


UNLIMITED = BudgetState()


@dataclass(frozen=True)
class Route:
    """Where one message goes and why.

    ``budget_exhausted`` is set when the LLM was wanted but the budget is spent: the target is
    then the policy's fallback (``bert`` with the BERT answer flagged, or ``defer``).
    ``labels`` holds the borderline labels of a multi-label message (empty otherwise).
    """

    target: Target
    reason: Reason
    labels: tuple[str, ...] = field(default=())
    budget_exhausted: bool = False

    @property
    def wants_llm(self) -> bool:
        """Whether the policy wanted the LLM for this message (whether or not it got it)."""
        return self.reason is not Reason.CONFIDENT


def escalation_reason(
    prediction: Prediction, spec: PolicySpec, task: Task = Task.CLASSIFY
) -> tuple[Reason, tuple[str, ...]]:
    """Why ``prediction`` needs the LLM under ``spec`` (``CONFIDENT`` if it does not).

    Also returns the borderline labels of a multi-label prediction.
    """
    if task in spec.generation.tasks:
        return Reason.TASK_NEEDS_GENERATION, ()
    rules = spec.escalation
    generated = set(spec.generation.labels)
    if spec.multi_label:
        if generated.intersection(prediction.labels_above(rules.flag_threshold)):
            return Reason.LABEL_NEEDS_GENERATION, ()
        borderline = tuple(
            label
            for label, p in zip(prediction.labels, prediction.probabilities, strict=True)
            if rules.band_for(label).contains(p)
        )
        if borderline:
            return Reason.UNCERTAIN_LABELS, borderline
        return Reason.CONFIDENT, ()
    top = prediction.top_label
    if top in generated:
        return Reason.LABEL_NEEDS_GENERATION, ()
    if prediction.top_probability < rules.min_probability_for(top):
        return Reason.LOW_CONFIDENCE, ()
    if prediction.margin < rules.min_margin_for(top):
        return Reason.LOW_MARGIN, ()
    return Reason.CONFIDENT, ()


def in_audit_sample(key: str, share: float) -> bool:
    """Whether the message with decision-cache key ``key`` is in an audit sample of ``share``.

    The key's SHA-256 read as a number in ``[0, 1)`` is below ``share``: a fixed, uniform draw
    over distinct texts that never depends on the model, so the same text is always in or
    always out, and every worker draws alike.
    """
    if share <= 0.0:
        return False
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def decide(
    prediction: Prediction,
    spec: PolicySpec,
    budget: BudgetState = UNLIMITED,
    task: Task = Task.CLASSIFY,
    audited: bool = False,
) -> Route:
    """Route one message.

    The BERT answer stands when it clears the policy's thresholds and nothing asks for
    generated text. Otherwise the message goes to the LLM, unless the budget is spent: then
    the policy's ``budget.when_exhausted`` applies (the BERT answer flagged, or deferral).
    An ``audited`` message (see :func:`in_audit_sample`) whose BERT answer would stand goes to
    the LLM too, with the reason ``audit``, while the budget lasts; with the budget spent its
    BERT answer stands unflagged, as it would have outside the sample.
    """
    reason, borderline = escalation_reason(prediction, spec, task)
    if reason is Reason.CONFIDENT:
        if audited and not budget.exhausted:
            return Route(Target.LLM, Reason.AUDIT)
        return Route(Target.BERT, reason)
    if budget.exhausted:
        fallback = (
            Target.DEFER if spec.budget.when_exhausted is WhenExhausted.DEFER else Target.BERT
        )
        return Route(fallback, reason, borderline, budget_exhausted=True)
    return Route(Target.LLM, reason, borderline)
