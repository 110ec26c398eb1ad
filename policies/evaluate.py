"""Cascade evaluation: accuracy and LLM cost versus the share of messages sent to the LLM.

Given the BERT tier's predictions on a labelled set, the LLM's answers to the same messages
(replayed from a file, or simulated by :func:`simulate_llm`) and the LLM's cost per call,
:func:`evaluate_cascade` draws the trade-off curve of a confidence cascade (send the ``k`` least
confident messages to the LLM, keep the BERT answer for the rest) and places on it the points
that matter: BERT only, LLM only, the policy's own operating point (routed exactly as
:func:`tiergate.policies.routing.decide` routes), and the smallest share that comes within one
accuracy point of LLM only, with the money it saves.

An *answer* is a label (single-label policies) or a frozenset of labels (multi-label; correct
only on an exact match). Everything here is pure: no files, no plots (``tiergate.gateway.report``
writes those).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from tiergate.policies.class_metrics import ClassMetrics, per_class_metrics
from tiergate.policies.prediction import Prediction
from tiergate.policies.routing import Target, decide
from tiergate.policies.spec import PolicySpec

Answer = str | frozenset[str]
"""A label (single-label) or the exact set of flagged labels (multi-label)."""

MATCHED_ACCURACY_POINTS = 1
"""How close, in accuracy percentage points, the cascade must come to LLM only to match it."""


def bert_answer(prediction: Prediction, spec: PolicySpec) -> Answer:
    """What the BERT tier answers when its answer stands.

    Single-label: the top label. Multi-label: the labels whose probability is at least the
    policy's ``escalation.flag_threshold`` (the same rule :func:`tiergate.policies.routing.decide`
    uses).
    """
    if spec.multi_label:
        return frozenset(prediction.labels_above(spec.escalation.flag_threshold))
    return prediction.top_label


def check_answers(
    predictions: Sequence[Prediction], gold: Sequence[Answer], spec: PolicySpec
) -> None:
    """Raise unless predictions and gold answers fit each other and ``spec``.

    They must be non-empty and of equal length; every prediction's head must match the
    policy's ``multi_label``; every gold answer must be a label string (single-label) or a
    frozenset of labels (multi-label). A wrong answer type is a ``TypeError``, anything
    else a ``ValueError``.
    """
    if not predictions:
        raise ValueError("no predictions to calibrate or evaluate")
    if len(predictions) != len(gold):
        raise ValueError(f"{len(predictions)} predictions but {len(gold)} gold answers")
    kind = "multi-label" if spec.multi_label else "single-label"
    for index, (prediction, answer) in enumerate(zip(predictions, gold, strict=True)):
        if prediction.multi_label != spec.multi_label:
            raise ValueError(f"prediction {index} does not come from a {kind} head")
        expected = frozenset if spec.multi_label else str
        if not isinstance(answer, expected):
            raise TypeError(
                f"gold answer {index} is a {type(answer).__name__}; a {kind} policy "
                f"needs a {expected.__name__}"
            )


def confidence_of(prediction: Prediction, spec: PolicySpec) -> float:
    """How sure the BERT tier is of ``prediction``; the curve sends the least sure first.

    Single-label: the calibrated top-1 probability. Multi-label: the distance from the flag
    threshold of the most borderline label (``min |p - flag_threshold|``).
    """
    if spec.multi_label:
        threshold = spec.escalation.flag_threshold
        return min(abs(p - threshold) for p in prediction.probabilities)
    return prediction.top_probability


@dataclass(frozen=True)
class CurvePoint:
    """One point of the cascade: a share of messages sent to the LLM and what it gives.

    ``llm_share`` is the exact share of messages the LLM answered, ``accuracy`` the share of
    all messages answered correctly, ``cost_per_1000`` the LLM spend in USD per 1,000 messages.
    On the confidence curve, ``threshold`` is the confidence (see :func:`confidence_of`) of the
    least confident message BERT keeps: messages below it were sent (ties are broken by input
    order). It is ``None`` when every message was sent and for points that are not on the
    curve (the policy's operating point).
    """

    llm_share: float
    accuracy: float
    cost_per_1000: float
    threshold: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The point as a JSON-serialisable mapping."""
        return asdict(self)


@dataclass(frozen=True)
class Evaluation:
    """The cascade's trade-off on one labelled set, and the points worth reporting.

    ``curve`` holds the sampled confidence-cascade points from share 0 to 1; ``bert_only`` and
    ``llm_only`` are its endpoints. ``operating_point`` is the policy applied as
    :func:`tiergate.policies.routing.decide` applies it with an unlimited budget;
    ``operating_routes`` counts its routes by reason. ``matched_point`` is the least-LLM point (over
    every ``k``, not only the sampled ones) whose accuracy is within one point of LLM only, and
    ``cost_saving_vs_llm_only`` is ``1 - cost there / cost of LLM only`` (``None`` when LLM only
    costs nothing). ``missing_llm_answers`` counts messages the replay had no LLM answer for; each
    counts as wrong wherever the LLM answers it. ``per_class_bert_only`` and
    ``per_class_operating_point`` give each label's precision, recall, F1 and support for BERT's
    answers and for the answers at the operating point (a missing LLM answer predicts no label).
    ``priced`` is false when no price per LLM call was known: the costs are then zeros that mean
    "unknown", and :meth:`to_dict` reports them as ``None``.
    """

    policy: str
    policy_version: str
    multi_label: bool
    n: int
    missing_llm_answers: int
    curve: tuple[CurvePoint, ...]
    bert_only: CurvePoint
    llm_only: CurvePoint
    operating_point: CurvePoint
    operating_routes: dict[str, int]
    matched_point: CurvePoint
    cost_saving_vs_llm_only: float | None
    per_class_bert_only: dict[str, ClassMetrics]
    per_class_operating_point: dict[str, ClassMetrics]
    priced: bool = True

    @property
    def matched_accuracy_llm_share(self) -> float:
        """The smallest share of messages sent to the LLM that matches LLM-only accuracy."""
        return self.matched_point.llm_share

    def to_dict(self) -> dict[str, Any]:
        """The evaluation as a JSON-serialisable mapping; unpriced, every cost is ``None``."""
        document: dict[str, Any] = {
            "policy": self.policy,
            "policy_version": self.policy_version,
            "multi_label": self.multi_label,
            "n": self.n,
            "missing_llm_answers": self.missing_llm_answers,
            "bert_only": self.bert_only.to_dict(),
            "llm_only": self.llm_only.to_dict(),
            "operating_point": self.operating_point.to_dict(),
            "operating_routes": dict(self.operating_routes),
            "matched_accuracy_llm_share": self.matched_accuracy_llm_share,
            "matched_point": self.matched_point.to_dict(),
            "cost_saving_vs_llm_only": self.cost_saving_vs_llm_only,
            "per_class": {
                "bert_only": _dump(self.per_class_bert_only),
                "operating_point": _dump(self.per_class_operating_point),
            },
            "curve": [point.to_dict() for point in self.curve],
            "priced": self.priced,
        }
        if not self.priced:
            points = [document[key] for key in ("bert_only", "llm_only", "operating_point")]
            for point in [*points, document["matched_point"], *document["curve"]]:
                point["cost_per_1000"] = None
        return document


def evaluate_cascade(
    predictions: Sequence[Prediction],
    gold: Sequence[Answer],
    llm_answers: Sequence[Answer | None],
    llm_costs: Sequence[float] | float | None,
    spec: PolicySpec,
    points: int = 101,
) -> Evaluation:
    """Evaluate the cascade of ``spec`` on a labelled set.

    Args:
        predictions: the BERT tier's prediction per message.
        gold: the right answer per message (a label, or a frozenset for multi-label).
        llm_answers: the LLM's answer per message; ``None`` where the replay has none (it
            counts as wrong and is reported in ``missing_llm_answers``).
        llm_costs: USD per LLM call, per message or one figure for all; ``None`` when no
            price is known (the evaluation is then unpriced: ``priced`` is false).
        spec: the policy; its escalation rules give the operating point, its flag threshold
            the multi-label BERT answer and confidence.
        points: how many shares from 0 to 1 (inclusive) the curve samples; at least 2.

    Returns:
        The :class:`Evaluation`. On the curve a message sent to the LLM takes the LLM's whole
        answer. At the operating point a multi-label message routed for borderline labels takes
        the LLM's verdict on those labels only and BERT's on the rest, since only they are put
        to the LLM; a message routed for another reason takes the LLM's whole answer.
    """
    check_answers(predictions, gold, spec)
    n = len(predictions)
    if len(llm_answers) != n:
        raise ValueError(f"{n} predictions but {len(llm_answers)} LLM answers")
    costs = _costs(0.0 if llm_costs is None else llm_costs, n)
    if points < 2:
        raise ValueError("the curve needs at least 2 points (share 0 and share 1)")

    bert = [bert_answer(p, spec) for p in predictions]
    bert_correct = np.array([a == g for a, g in zip(bert, gold, strict=True)], dtype=np.int64)
    llm_correct = np.array(
        [a is not None and a == g for a, g in zip(llm_answers, gold, strict=True)],
        dtype=np.int64,
    )
    confidence = np.array([confidence_of(p, spec) for p in predictions], dtype=np.float64)
    order = np.argsort(confidence, kind="stable")  # least confident first; ties by input order
    correct_at = _correct_by_sent(bert_correct[order], llm_correct[order])
    cost_at = np.concatenate(([0.0], np.cumsum(costs[order])))

    def point(k: int) -> CurvePoint:
        return CurvePoint(
            llm_share=k / n,
            accuracy=int(correct_at[k]) / n,
            cost_per_1000=1000.0 * float(cost_at[k]) / n,
            threshold=float(confidence[order[k]]) if k < n else None,
        )

    sampled = sorted({round(i * n / (points - 1)) for i in range(points)})
    matched_k = matched_accuracy_count(correct_at)
    llm_cost = float(cost_at[n])
    matched_cost = float(cost_at[matched_k])
    operating, routes, final = _operating_point(predictions, gold, llm_answers, costs, spec)
    labels = spec.label_names
    truth = answer_matrix(gold, labels)
    return Evaluation(
        policy=spec.name,
        policy_version=spec.version,
        multi_label=spec.multi_label,
        n=n,
        missing_llm_answers=sum(answer is None for answer in llm_answers),
        curve=tuple(point(k) for k in sampled),
        bert_only=point(0),
        llm_only=point(n),
        operating_point=operating,
        operating_routes=routes,
        matched_point=point(matched_k),
        cost_saving_vs_llm_only=1.0 - matched_cost / llm_cost if llm_cost > 0 else None,
        per_class_bert_only=per_class_metrics(answer_matrix(bert, labels), truth, labels),
        per_class_operating_point=per_class_metrics(answer_matrix(final, labels), truth, labels),
        priced=llm_costs is not None,
    )


def answer_matrix(answers: Sequence[Answer | None], labels: Sequence[str]) -> npt.NDArray[np.bool_]:
    """Answers as an ``(n, len(labels))`` 0/1 matrix; ``None`` (no answer) is a row of zeros.

    Raises:
        ValueError: an answer names a label outside ``labels``.
    """
    column = {label: j for j, label in enumerate(labels)}
    matrix = np.zeros((len(answers), len(labels)), dtype=bool)
    for row, answer in enumerate(answers):
        named = () if answer is None else (answer,) if isinstance(answer, str) else answer
        for label in named:
            if label not in column:
                raise ValueError(f"answer {row} names {label!r}, not a label of the policy")
            matrix[row, column[label]] = True
    return matrix


def _dump(per_class: dict[str, ClassMetrics]) -> dict[str, dict[str, Any]]:
    return {label: metrics.model_dump() for label, metrics in per_class.items()}


def matched_accuracy_count(correct_at: npt.NDArray[np.int64]) -> int:
    """The smallest ``k`` whose correct count is within one accuracy point of LLM only.

    ``correct_at[k]`` is the number of messages answered correctly when the ``k`` least
    confident go to the LLM (``k`` from 0 to ``n``). The comparison is done in whole counts
    (``100 * correct_k >= 100 * correct_n - n``) so that a tie at exactly one point is not
    lost to rounding.
    """
    n = len(correct_at) - 1
    needed = 100 * int(correct_at[n]) - MATCHED_ACCURACY_POINTS * n
    reaching = np.flatnonzero(100 * correct_at >= needed)
    return int(reaching[0])


def _correct_by_sent(
    bert_correct: npt.NDArray[np.int64], llm_correct: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """Correct answers when the first ``k`` messages go to the LLM, for every ``k`` in 0..n."""
    llm_prefix = np.concatenate(([0], np.cumsum(llm_correct)))
    bert_prefix = np.concatenate(([0], np.cumsum(bert_correct)))
    result: npt.NDArray[np.int64] = llm_prefix + (bert_prefix[-1] - bert_prefix)
    return result


def _costs(llm_costs: Sequence[float] | float, n: int) -> npt.NDArray[np.float64]:
    """The per-message LLM cost array, validated (finite and non-negative)."""
    if isinstance(llm_costs, int | float):
        costs = np.full(n, float(llm_costs))
    else:
        if len(llm_costs) != n:
            raise ValueError(f"{n} predictions but {len(llm_costs)} LLM costs")
        costs = np.asarray(llm_costs, dtype=np.float64)
    if not np.isfinite(costs).all() or (costs < 0).any():
        raise ValueError("LLM costs must be finite and non-negative")
    return costs


def _operating_point(
    predictions: Sequence[Prediction],
    gold: Sequence[Answer],
    llm_answers: Sequence[Answer | None],
    costs: npt.NDArray[np.float64],
    spec: PolicySpec,
) -> tuple[CurvePoint, dict[str, int], list[Answer | None]]:
    """The policy's own point: every message routed by ``decide`` with an unlimited budget.

    Returns the point, the routes counted by reason, and the final answer of each message.
    """
    correct = 0
    sent = 0
    spent = 0.0
    reasons: Counter[str] = Counter()
    final: list[Answer | None] = []
    for prediction, right, llm, cost in zip(predictions, gold, llm_answers, costs, strict=True):
        route = decide(prediction, spec)
        reasons[route.reason.value] += 1
        answer: Answer | None = bert_answer(prediction, spec)
        if route.target is Target.LLM:
            sent += 1
            spent += float(cost)
            answer = _merge_borderline(prediction, spec, route.labels, llm)
        correct += answer is not None and answer == right
        final.append(answer)
    n = len(predictions)
    point = CurvePoint(llm_share=sent / n, accuracy=correct / n, cost_per_1000=1000 * spent / n)
    return point, dict(sorted(reasons.items())), final


def _merge_borderline(
    prediction: Prediction, spec: PolicySpec, borderline: tuple[str, ...], llm: Answer | None
) -> Answer | None:
    """The final answer of a routed message: the LLM's, or for borderline labels a merge."""
    if llm is None or not borderline:
        return llm
    assert isinstance(llm, frozenset)  # borderline labels exist only under multi-label policies
    kept = prediction.labels_above(spec.escalation.flag_threshold)
    return frozenset({label for label in kept if label not in borderline} | (llm & set(borderline)))


def simulate_llm(
    gold: Sequence[Answer], labels: Sequence[str], accuracy: float, seed: int
) -> list[Answer]:
    """A *simulated* LLM for evaluation without a replay file: right with a fixed probability.

    Each message's answer is its gold answer with probability ``accuracy``; otherwise, for a
    label, a uniformly drawn different label from ``labels``, and for a label set, a uniformly
    drawn different subset of ``labels``. The same ``seed`` gives the same answers.
    """
    if not 0.0 <= accuracy <= 1.0 or math.isnan(accuracy):
        raise ValueError(f"accuracy must lie in [0, 1], not {accuracy}")
    if len(set(labels)) < 2:
        raise ValueError("a simulated LLM needs at least two labels to be wrong with")
    rng = random.Random(seed)
    answers: list[Answer] = []
    for right in gold:
        if rng.random() < accuracy:
            answers.append(right)
        elif isinstance(right, str):
            answers.append(rng.choice([label for label in labels if label != right]))
        else:
            answers.append(_different_subset(rng, labels, right))
    return answers


def _different_subset(rng: random.Random, labels: Sequence[str], right: frozenset[str]) -> Answer:
    """A uniformly drawn subset of ``labels`` other than ``right`` (by rejection)."""
    while True:
        drawn = frozenset(label for label in labels if rng.random() < 0.5)
        if drawn != right:
            return drawn
