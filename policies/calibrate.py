"""Threshold calibration: new escalation rules chosen from labelled predictions.

``tiergate calibrate`` reads the BERT tier's calibrated predictions on a labelled validation
set and writes a new :class:`~tiergate.policies.spec.Escalation` for one of two goals:

- :func:`calibrate_for_accuracy`: the loosest thresholds whose accepted BERT answers (those
  :func:`tiergate.policies.routing.decide` lets stand) reach a target accuracy *with statistical
  confidence*: the exact one-sided Clopper-Pearson upper bound on the error rate of accepted
  answers must be at most ``1 - target``. Many thresholds are tried on the same data, so the
  search is fixed-sequence testing (Learn then Test; Angelopoulos et al., 2021): candidates are
  tested from the strictest to the loosest and the scan stops at the first that fails, which
  keeps the chance of certifying a threshold whose true error exceeds the target at most
  ``1 - confidence`` without any multiplicity correction.
- :func:`calibrate_for_llm_share`: the thresholds whose share of messages sent to the LLM is
  closest to a target share without exceeding it.

What is tuned: for a single-label policy, ``min_probability`` over the observed top-1
probabilities; ``min_margin`` is set to 0 and per-label overrides are dropped, so one number
governs every label. For a multi-label policy, one symmetric uncertainty band
``[flag_threshold - w, flag_threshold + w)`` (clipped to ``[0, 1]``) shared by every label, with
the width ``w`` tuned; per-label bands are dropped and a message is accepted when no label is
borderline, its answer being right when the flagged label set equals the gold set exactly.
Messages the LLM gets for other reasons (labels that need a generated answer) count as sent and
never as accepted.

Per-label thresholds (``calibrate_for_accuracy(..., per_label=True)``, single-label only): the
messages are split by the BERT top label into disjoint groups, and each group gets a fixed
sequence of its own. A label gets a group (and a ``per_label`` override) when it has enough
messages for its loosest threshold to join the scan; the other labels are pooled into one group
whose threshold is the global ``min_probability``. The groups are chosen from the counts of top
labels alone, never from which answers are right, so every test stays fixed in advance. To keep
the same guarantee, the error probability ``1 - confidence`` is split evenly over the ``G``
groups (Bonferroni): each scan runs at ``1 - (1 - confidence) / G``, so with probability at least
``confidence`` every group's accepted error is within ``1 - target``, and so is that of all
accepted answers together, their weighted mean. A group whose scan certifies nothing sends all
of its messages to the LLM (thresholds of 1 on both probability and margin, which only a
one-hot prediction clears): testing its label again inside the pooled group after it failed
would reuse the same data and void the guarantee. Multi-label policies have no per-label mode
(a message there is accepted only when no label is borderline, so labels do not split the
messages into groups).

Pure: numpy and the standard library only (Clopper-Pearson is computed here, without scipy).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt

from tiergate.policies.evaluate import Answer, bert_answer, check_answers
from tiergate.policies.prediction import Prediction
from tiergate.policies.spec import Band, Escalation, LabelThresholds, PolicyError, PolicySpec

_VERSION_LIMIT = 64  # PolicySpec.version's max_length
_CALIBRATED_SUFFIX = re.compile(r"\+cal\.[0-9a-f]{8}$")


# --- Clopper-Pearson -------------------------------------------------------------------------


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """``I_x(a, b)``, the regularised incomplete beta function, for ``a, b > 0``, ``x in [0, 1]``.

    Evaluated by Lentz's continued fraction (Numerical Recipes, section 6.4) on whichever of
    ``I_x(a, b)`` and ``1 - I_{1-x}(b, a)`` converges fast, with the prefactor in log space
    (``math.lgamma``) so that large counts neither overflow nor underflow.
    """
    if not (a > 0 and b > 0):
        raise ValueError(f"beta parameters must be positive, not a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must lie in [0, 1], not {x}")
    if x in {0.0, 1.0}:
        return x
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 100_000):
        m2 = 2 * m
        for numerator in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            return h
    raise ArithmeticError(f"incomplete beta did not converge for a={a}, b={b}, x={x}")


def binomial_cdf(k: int, n: int, p: float) -> float:
    """``P(X <= k)`` for ``X ~ Binomial(n, p)``, through ``I_{1-p}(n - k, k + 1)``."""
    if n < 0:
        raise ValueError(f"n must not be negative, not {n}")
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return regularized_incomplete_beta(n - k, k + 1, 1.0 - p)


def clopper_pearson_upper(errors: int, n: int, confidence: float = 0.95) -> float:
    """The exact one-sided Clopper-Pearson upper bound on an error rate.

    The ``p`` at which ``P(X <= errors) = 1 - confidence`` for ``X ~ Binomial(n, p)``: with
    probability at least ``confidence`` the true rate is no higher. ``errors = 0`` gives
    ``1 - (1 - confidence) ** (1 / n)``; ``errors = n`` (or ``n = 0``, no evidence) gives 1.
    Found by bisection to within ``1e-12``, reporting the upper end so that the bound never
    understates.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), not {confidence}")
    if not 0 <= errors <= n:
        raise ValueError(f"errors must lie in [0, n], not {errors} of {n}")
    if errors == n:
        return 1.0
    alpha = 1.0 - confidence
    low, high = 0.0, 1.0
    while high - low > 1e-12:
        middle = (low + high) / 2.0
        if binomial_cdf(errors, n, middle) > alpha:
            low = middle
        else:
            high = middle
    return high


def accuracy_interval(correct: int, n: int, confidence: float) -> tuple[float, float]:
    """The two-sided Clopper-Pearson interval at ``confidence`` of ``correct`` right of ``n``.

    Each side is the exact one-sided bound at ``1 - (1 - confidence) / 2``.
    """
    one_sided = 1.0 - (1.0 - confidence) / 2.0
    low = 1.0 - clopper_pearson_upper(n - correct, n, one_sided)
    high = clopper_pearson_upper(correct, n, one_sided)
    return low, high


# --- Result ----------------------------------------------------------------------------------


class CalibrationGoal(StrEnum):
    """What a calibration aims at: an accuracy of accepted answers, or a share sent to the LLM."""

    ACCURACY = "accuracy"
    LLM_SHARE = "llm_share"


@dataclass(frozen=True)
class ThresholdTest:
    """One threshold the accuracy goal's fixed sequence tested, with what it accepted.

    ``accepted`` answers stood under ``threshold``, ``errors`` of them wrong;
    ``error_upper_bound`` is their Clopper-Pearson bound, and ``passed`` says whether it was
    within ``1 - target``.
    """

    threshold: float
    accepted: int
    errors: int
    error_upper_bound: float
    passed: bool


@dataclass(frozen=True)
class DataNeeded:
    """How many validation messages a target would need, estimated from one threshold's rates.

    ``messages`` validation messages would certify the target if the share of messages accepted
    at ``threshold`` (``accepted_share``) and the error rate of those answers (``error_rate``)
    stayed as on this data; ``accepted`` of them would then be accepted. The threshold is the
    one that needs the fewest messages. ``messages`` and ``accepted`` are None when no
    threshold's error rate here is below ``1 - target`` (then no amount of data at this
    accuracy certifies it, and ``threshold`` is the one with the lowest error rate).
    """

    messages: int | None
    accepted: int | None
    threshold: float
    accepted_share: float
    error_rate: float


@dataclass(frozen=True)
class LabelGroup:
    """One group of a per-label calibration: the messages whose BERT top label is in ``labels``.

    An ``own_threshold`` group holds one label and is written as its ``per_label`` override;
    the pooled group holds the labels without one and is written as the global
    ``min_probability``. ``messages`` counts each label's messages, in the order of ``labels``.
    ``certified`` says whether the group's fixed sequence passed a threshold; if not,
    ``threshold`` is 1 and the group's messages all go to the LLM. ``accepted`` and ``errors``
    are at ``threshold``; ``error_upper_bound`` is their Clopper-Pearson bound at the per-group
    confidence (1 with nothing accepted); ``tested`` counts the thresholds the scan tested, and
    ``last_test`` is the last of them (where an uncertified group's scan failed; None if none).
    """

    labels: tuple[str, ...]
    messages: tuple[int, ...]
    own_threshold: bool
    threshold: float
    accepted: int
    errors: int
    error_upper_bound: float
    certified: bool
    tested: int
    last_test: ThresholdTest | None


@dataclass(frozen=True)
class PerLabelCalibration:
    """How a per-label calibration split the messages, and what each group certified.

    ``groups`` lists the labels with their own threshold (most messages first), then the pooled
    group. Each group's scan ran at ``group_confidence``, ``1 - (1 - confidence) / G`` for ``G``
    groups. ``messages_needed`` is how many messages with a given top label a group needs at
    that confidence (so that its loosest threshold joins the scan): a pooled label with fewer has
    too few for a threshold of its own (None when no number would do, as for a target of 1).
    When no label has its own (one group, tested at the full confidence), it is what each of
    two groups would need.
    """

    groups: tuple[LabelGroup, ...]
    group_confidence: float
    messages_needed: int | None

    @property
    def own(self) -> tuple[LabelGroup, ...]:
        """The groups of labels with a threshold of their own."""
        return tuple(group for group in self.groups if group.own_threshold)

    @property
    def pooled(self) -> LabelGroup | None:
        """The group of labels that keep the global threshold (None when every label has one)."""
        return next((group for group in self.groups if not group.own_threshold), None)


@dataclass(frozen=True)
class CalibrationResult:
    """A calibrated escalation rule and what it achieves on the data it was chosen on.

    ``threshold`` is the tuned number: ``min_probability`` for single-label policies, the
    band half-width ``w`` for multi-label ones (in both, larger is stricter and sends more to
    the LLM). ``accepted_share`` and ``llm_share`` split the ``n`` messages (they sum to 1);
    ``accepted_accuracy`` is the accuracy of accepted BERT answers (``None`` if none was
    accepted). For the accuracy goal ``error_upper_bound`` is the Clopper-Pearson bound at
    ``confidence`` on the accepted error rate (``None`` for the share goal). ``feasible`` is
    False when no threshold reaches the target: then the strictest candidate is returned (the
    accuracy goal) or the loosest (the share goal, when even it sends more than the target).

    When the accuracy goal is not reached, the result also says why: ``tested`` lists the
    thresholds the fixed sequence actually tested, strictest first (empty when none keeps
    enough answers to join it; the returned strictest candidate then was not tested),
    ``highest_certifiable`` is the highest target accuracy this data certifies at
    ``confidence`` (None if none), and ``data_needed`` estimates the validation messages the
    target needs. All three are empty for a reached or a share goal.

    A per-label calibration sets ``per_label`` (None otherwise): the groups and what each
    certified. ``threshold`` is then the global ``min_probability`` (that of the pooled group)
    and ``error_upper_bound`` the largest bound of a certified group, which with probability at
    least ``confidence`` bounds the error of all accepted answers. When two or more groups were
    tested and none certified, ``tested``, ``highest_certifiable`` and ``data_needed`` stay
    empty: the groups say what was tested.
    """

    escalation: Escalation
    goal: CalibrationGoal
    target: float
    n: int
    multi_label: bool
    threshold: float
    accepted_share: float
    llm_share: float
    accepted_accuracy: float | None
    error_upper_bound: float | None
    confidence: float | None
    feasible: bool
    tested: tuple[ThresholdTest, ...] = ()
    highest_certifiable: float | None = None
    data_needed: DataNeeded | None = None
    per_label: PerLabelCalibration | None = None
    llm_accuracy: float | None = None

    @property
    def over_all_messages(self) -> bool:
        """Whether the guarantee covers every message (see :func:`calibrate_for_accuracy`)."""
        return self.llm_accuracy is not None

    @property
    def expected_accuracy(self) -> float | None:
        """Accuracy over all messages: accepted answers as measured, the LLM's at ``llm_accuracy``.

        None without ``llm_accuracy`` (the LLM's accuracy is not known).
        """
        if self.llm_accuracy is None:
            return None
        kept = self.accepted_share * (self.accepted_accuracy or 0.0)
        return kept + self.llm_share * self.llm_accuracy

    def sending_everything(self, spec: PolicySpec) -> CalibrationResult:
        """This result with :func:`everything_to_llm`'s rules: nothing accepted, LLM share 1.

        What serves when no threshold certifies the target; ``feasible`` stays as it is.
        """
        return replace(
            self,
            escalation=everything_to_llm(spec),
            threshold=_STRICTEST_THRESHOLD,
            accepted_share=0.0,
            llm_share=1.0,
            accepted_accuracy=None,
            error_upper_bound=None,
        )

    def policy(self, spec: PolicySpec) -> PolicySpec:
        """``spec`` with this escalation, under the version ``<version>+cal.<hash>``.

        ``<hash>`` is the first 8 hex digits of the SHA-256 of the escalation rules as sorted
        JSON, so the same thresholds always give the same version and the decision cache never
        mixes decisions made under different rules. A ``+cal.<hash>`` suffix already on
        ``spec.version`` is replaced rather than stacked; a version that would exceed 64
        characters is a :class:`~tiergate.policies.spec.PolicyError`.
        """
        if spec.multi_label != self.multi_label:
            raise ValueError("a calibration applies only to a policy of the same label kind")
        rules = json.dumps(self.escalation.model_dump(mode="json"), sort_keys=True)
        digest = hashlib.sha256(rules.encode()).hexdigest()[:8]
        version = f"{_CALIBRATED_SUFFIX.sub('', spec.version)}+cal.{digest}"
        if len(version) > _VERSION_LIMIT:
            raise PolicyError(
                f"version: calibrated version {version!r} is longer than {_VERSION_LIMIT} "
                "characters; shorten the policy's version"
            )
        return spec.with_escalation(self.escalation, version)

    def to_dict(self) -> dict[str, Any]:
        """The result as a JSON-serialisable mapping (the escalation as the policy file has it)."""
        return {
            "goal": self.goal.value,
            "target": self.target,
            "n": self.n,
            "multi_label": self.multi_label,
            "threshold": self.threshold,
            "accepted_share": self.accepted_share,
            "llm_share": self.llm_share,
            "accepted_accuracy": self.accepted_accuracy,
            "error_upper_bound": self.error_upper_bound,
            "confidence": self.confidence,
            "feasible": self.feasible,
            "escalation": self.escalation.model_dump(mode="json"),
            "tested": [asdict(test) for test in self.tested],
            "highest_certifiable": self.highest_certifiable,
            "data_needed": (None if self.data_needed is None else asdict(self.data_needed)),
            "per_label": None if self.per_label is None else asdict(self.per_label),
            "llm_accuracy": self.llm_accuracy,
            "expected_accuracy": self.expected_accuracy,
        }


# --- The sweep over candidate thresholds -------------------------------------------------------


@dataclass(frozen=True)
class _Sweep:
    """Candidate thresholds, strictest first, with what each accepts on the data."""

    thresholds: list[float]
    escalations: list[Escalation]
    accepted: list[int]
    errors: list[int]
    n: int
    _bounds: dict[float, list[float]] = field(default_factory=dict, compare=False, repr=False)

    def upper_bounds(self, confidence: float, count: int) -> list[float]:
        """The Clopper-Pearson bounds of the first ``count`` candidates, each computed once."""
        bounds = self._bounds.setdefault(confidence, [])
        bounds.extend(
            clopper_pearson_upper(self.errors[i], self.accepted[i], confidence)
            for i in range(len(bounds), count)
        )
        return bounds[:count]

    def result(
        self,
        index: int,
        *,
        goal: CalibrationGoal,
        target: float,
        multi_label: bool,
        feasible: bool,
        confidence: float | None,
    ) -> CalibrationResult:
        accepted, errors = self.accepted[index], self.errors[index]
        return CalibrationResult(
            escalation=self.escalations[index],
            goal=goal,
            target=target,
            n=self.n,
            multi_label=multi_label,
            threshold=self.thresholds[index],
            accepted_share=accepted / self.n,
            llm_share=(self.n - accepted) / self.n,
            accepted_accuracy=(accepted - errors) / accepted if accepted else None,
            error_upper_bound=(
                clopper_pearson_upper(errors, accepted, confidence)
                if confidence is not None
                else None
            ),
            confidence=confidence,
            feasible=feasible,
        )


def _sweep(predictions: Sequence[Prediction], gold: Sequence[Answer], spec: PolicySpec) -> _Sweep:
    check_answers(predictions, gold, spec)
    wrong = np.array(
        [bert_answer(p, spec) != g for p, g in zip(predictions, gold, strict=True)],
        dtype=np.int64,
    )
    if spec.multi_label:
        return _band_sweep(predictions, wrong, spec)
    return _probability_sweep(predictions, wrong, spec)


def _probability_sweep(
    predictions: Sequence[Prediction], wrong: npt.NDArray[np.int64], spec: PolicySpec
) -> _Sweep:
    """Single-label candidates: each observed top-1 probability as ``min_probability``.

    ``decide`` keeps an answer when its top-1 probability is at least ``min_probability`` and
    its top label needs no generated text (a margin is never below the 0 this sets).
    """
    generated = set(spec.generation.labels)
    keys = np.array(
        [-math.inf if p.top_label in generated else p.top_probability for p in predictions]
    )
    order = np.argsort(keys, kind="stable")
    ascending = keys[order]
    wrong_prefix = np.concatenate(([0], np.cumsum(wrong[order])))
    candidates = sorted({float(k) for k in keys if k > -math.inf}, reverse=True) or [1.0]
    first_kept = np.searchsorted(ascending, candidates, side="left")
    n = len(predictions)
    return _Sweep(
        thresholds=candidates,
        escalations=[
            spec.escalation.model_copy(
                update={"min_probability": t, "min_margin": 0.0, "per_label": {}}
            )
            for t in candidates
        ],
        accepted=[int(n - i) for i in first_kept],
        errors=[int(wrong_prefix[-1] - wrong_prefix[i]) for i in first_kept],
        n=n,
    )


def _band_sweep(
    predictions: Sequence[Prediction], wrong: npt.NDArray[np.int64], spec: PolicySpec
) -> _Sweep:
    """Multi-label candidates: widths of one band ``[t - w, t + w)`` around the flag threshold.

    A message is accepted when every label is outside the band and no flagged label needs
    generated text. With ``below`` the highest probability under ``t`` and ``above`` the
    lowest at or over it, that is ``low > below and high <= above``. The band edges are
    computed once per width exactly as the escalation stores them, so acceptance here agrees
    with ``Band.contains`` to the last bit. Candidate widths are the breakpoints ``t - below``
    and ``above - t``, the midpoints between consecutive breakpoints (the accepted set between
    two breakpoints differs from the set at either), and 0.
    """
    t = spec.escalation.flag_threshold
    generated = set(spec.generation.labels)
    below = np.full(len(predictions), -math.inf)
    above = np.full(len(predictions), math.inf)
    usable = np.ones(len(predictions), dtype=bool)
    for index, prediction in enumerate(predictions):
        under = [p for p in prediction.probabilities if p < t]
        over = [p for p in prediction.probabilities if p >= t]
        below[index] = max(under, default=-math.inf)
        above[index] = min(over, default=math.inf)
        usable[index] = not generated.intersection(prediction.labels_above(t))
    breakpoints = sorted(
        {0.0}
        | {t - float(b) for b in below if b > -math.inf}
        | {float(a) - t for a in above if a < math.inf}
    )
    midpoints = [(x + y) / 2.0 for x, y in itertools.pairwise(breakpoints)]
    widths = np.array(sorted(set(breakpoints) | set(midpoints)))  # loosest first here
    lows = np.maximum(0.0, t - widths)
    highs = np.minimum(1.0, t + widths)
    # accepted at width index j exactly when j < limit; lows fall and highs rise with j
    limit = np.minimum(
        np.searchsorted(-lows, -below, side="left"), np.searchsorted(highs, above, side="right")
    )
    limit[~usable] = 0
    size = len(widths)
    accepted = np.cumsum(np.bincount(limit, minlength=size + 1)[::-1])[::-1][1:]
    errors = np.cumsum(np.bincount(limit, weights=wrong, minlength=size + 1)[::-1])[::-1][1:]
    strict_first = range(size - 1, -1, -1)
    # A width that accepts nothing can never be certified; leave it out of the sequence.
    kept = [j for j in strict_first if accepted[j] > 0] or [size - 1]
    return _Sweep(
        thresholds=[float(widths[j]) for j in kept],
        escalations=[
            spec.escalation.model_copy(
                update={
                    "band": Band(low=float(lows[j]), high=float(highs[j])),
                    "per_label": {},
                }
            )
            for j in kept
        ],
        accepted=[int(accepted[j]) for j in kept],
        errors=[round(float(errors[j])) for j in kept],
        n=len(predictions),
    )


_SAMPLE_FACTOR = 3
"""A candidate joins the test sequence once a third of its accepted answers could certify the
target with no errors. Starting earlier, where one unlucky error among the few most confident
answers ends the scan, would make certification a matter of luck; starting later costs
coverage."""


def _eligible_from(counts: Sequence[int], confidence: float) -> npt.NDArray[np.float64]:
    """Per candidate, the smallest allowed error at which it joins the test sequence.

    That is ``1 - (1 - confidence) ** (3 / accepted)``: ``accepted / 3`` answers with no
    errors would bring the Clopper-Pearson bound down to it. It depends on counts only, never
    on correctness, so the sequence is fixed before the test and the guarantee holds.
    """
    risk = 1.0 - confidence
    return np.array([1.0 - risk ** (_SAMPLE_FACTOR / n) if n else math.inf for n in counts])


def _lower_targets_reach(
    sweep: _Sweep, eligible_at: npt.NDArray[np.float64], start: int, confidence: float
) -> bool:
    """Whether every lower accuracy target's scan gets past the first ``start`` candidates.

    At an allowed error ``e``, a scan starts at the first candidate eligible at ``e`` and
    fails at the first whose Clopper-Pearson bound exceeds ``e``. Both conditions change only
    at those levels, so checking ``e`` at each level of the skipped candidates covers every
    lower target.
    """
    if start == 0:
        return True
    eligible_at = eligible_at[:start]
    passes_at = np.array(sweep.upper_bounds(confidence, start))
    for allowed_error in sorted({*eligible_at.tolist(), *passes_at.tolist()} - {math.inf}):
        eligible = np.flatnonzero(eligible_at <= allowed_error)
        if eligible.size and (passes_at[eligible[0] :] > allowed_error).any():
            return False
    return True


def _scan(
    sweep: _Sweep, eligible_at: npt.NDArray[np.float64], allowed_error: float, confidence: float
) -> tuple[range, int | None]:
    """The candidates the fixed sequence tests at ``allowed_error``, and the loosest certified.

    The sequence starts at the first candidate eligible at ``allowed_error`` and stops after
    the first whose binomial tail at that rate exceeds ``1 - confidence``. A pass counts only
    if every lower target's scan also gets past the candidates this one skips.
    """
    start = next(
        (i for i, level in enumerate(eligible_at) if level <= allowed_error), len(eligible_at)
    )
    passed: int | None = None
    stop = start
    for index in range(start, len(sweep.accepted)):
        stop = index + 1
        tail = binomial_cdf(sweep.errors[index], sweep.accepted[index], allowed_error)
        if tail > 1.0 - confidence:
            break
        passed = index
    if passed is not None and not _lower_targets_reach(sweep, eligible_at, start, confidence):
        passed = None
    return range(start, stop), passed


def _highest_certifiable(
    sweep: _Sweep, eligible_at: npt.NDArray[np.float64], confidence: float
) -> float | None:
    """The highest target accuracy that :func:`calibrate_for_accuracy` certifies on the sweep.

    Whether a target is certified changes only where the allowed error crosses a candidate's
    entry level or its Clopper-Pearson bound, and a certified target certifies every lower one,
    so the answer is one minus the smallest such level that certifies (found by bisection).
    """
    bounds = sweep.upper_bounds(confidence, len(sweep.accepted))
    levels = sorted(level for level in {*bounds, *eligible_at.tolist()} if level < 1.0)
    low, high = 0, len(levels)
    while low < high:
        middle = (low + high) // 2
        if _scan(sweep, eligible_at, levels[middle], confidence)[1] is not None:
            high = middle
        else:
            low = middle + 1
    return 1.0 - levels[low] if low < len(levels) else None


_MOST_ANSWERS = 10**8
"""The largest count :func:`accepted_needed` searches (the incomplete beta of counts much larger
than this converges too slowly to be worth it, and no validation set is that large)."""


def accepted_needed(
    error_rate: float, target_accuracy: float, confidence: float = 0.95
) -> int | None:
    """How many accepted answers one threshold needs to certify ``target_accuracy``.

    The larger of two counts, with a share ``error_rate`` of the answers wrong: enough for the
    Clopper-Pearson bound at ``confidence`` to be at most ``1 - target_accuracy`` (with no
    errors, 299 for 99% at 95% confidence), and enough for the threshold to join the test
    sequence at all, three times the zero-error count (895 there). None when ``error_rate`` is
    not below ``1 - target_accuracy``, where no number of answers at that error rate certifies
    it, or so close below that more than ``10**8`` answers would be needed.
    """
    if not 0.0 <= error_rate <= 1.0:
        raise ValueError(f"error rate must lie in [0, 1], not {error_rate}")
    if not 0.0 < target_accuracy <= 1.0:
        raise ValueError(f"target accuracy must lie in (0, 1], not {target_accuracy}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), not {confidence}")
    allowed_error = 1.0 - target_accuracy
    if error_rate >= allowed_error:
        return None
    alpha = 1.0 - confidence
    entry = math.ceil(_SAMPLE_FACTOR * math.log(alpha) / math.log1p(-allowed_error))
    while entry > 1 and _eligible_from([entry - 1], confidence)[0] <= allowed_error:
        entry -= 1  # the same inequality _eligible_from applies, free of rounding in the log
    while _eligible_from([entry], confidence)[0] > allowed_error:
        entry += 1

    def certifies(accepted: int) -> bool:
        # the binomial tail P(X <= error_rate * accepted) at the allowed error, errors real-valued
        errors = error_rate * accepted
        tail = regularized_incomplete_beta(accepted - errors, errors + 1.0, target_accuracy)
        return tail <= alpha

    high = 1
    while not certifies(high):
        high *= 2
        if high > _MOST_ANSWERS:
            return None
    low = high // 2 + 1 if high > 1 else 1
    while low < high:
        middle = (low + high) // 2
        if certifies(middle):
            high = middle
        else:
            low = middle + 1
    return max(entry, high)


def _data_needed(sweep: _Sweep, target_accuracy: float, confidence: float) -> DataNeeded:
    """The fewest validation messages that would certify the target, over the candidates.

    For each candidate, if its accepted share and their error rate stayed as observed, the
    messages needed are the accepted answers needed (:func:`accepted_needed`) over that share.
    """
    best: DataNeeded | None = None
    lowest_rate: DataNeeded | None = None
    for threshold, accepted, errors in zip(
        sweep.thresholds, sweep.accepted, sweep.errors, strict=True
    ):
        if accepted == 0:
            continue
        share, rate = accepted / sweep.n, errors / accepted
        if lowest_rate is None or rate < lowest_rate.error_rate:
            lowest_rate = DataNeeded(None, None, threshold, share, rate)
        needed = accepted_needed(rate, target_accuracy, confidence)
        if needed is None:
            continue
        messages = math.ceil(needed * sweep.n / accepted)
        if best is None or messages < (best.messages or math.inf):
            best = DataNeeded(messages, needed, threshold, share, rate)
    if best is not None:
        return best
    if lowest_rate is not None:
        return lowest_rate
    return DataNeeded(None, None, sweep.thresholds[0], 0.0, 1.0)


# --- The two goals -----------------------------------------------------------------------------


def calibrate_for_accuracy(
    predictions: Sequence[Prediction],
    gold: Sequence[Answer],
    spec: PolicySpec,
    target_accuracy: float,
    confidence: float = 0.95,
    *,
    per_label: bool = False,
    llm_accuracy: float | None = None,
) -> CalibrationResult:
    """The loosest thresholds whose accepted answers certifiably reach ``target_accuracy``.

    With ``llm_accuracy`` the guarantee covers every message instead: the accepted BERT answers
    together with the LLM's, these counted right at the rate ``llm_accuracy`` (the LLM's
    measured accuracy, for instance its agreement with people's corrections). See
    :func:`_calibrate_over_all`. Without it (the default) the guarantee is on accepted answers
    alone, so a better model that keeps more answers lowers the accuracy of the whole stream
    toward the target; over all messages it keeps the whole stream's accuracy and lowers the
    LLM share instead.

    Candidates are tested from the strictest to the loosest; a candidate passes when the
    Clopper-Pearson upper bound at ``confidence`` on its accepted error rate is at most
    ``1 - target_accuracy`` (tested exactly, as the binomial tail ``P(X <= errors)`` at that
    rate being at most ``1 - confidence``), and the scan stops at the first failure. The
    sequence starts at the first candidate that accepts enough answers for a third of them to
    certify the target with no errors (stricter ones accept too few to be worth a test). The
    loosest passing candidate is returned. If none passes, the result says ``feasible=False``,
    holds the strictest candidate, which sends almost every message to the LLM, and explains
    itself: the thresholds tested, the highest target this data certifies, and the validation
    messages the target would need. A target of 1 is never feasible (no finite sample
    certifies zero error).

    Raising the target never loosens the threshold: a higher target's sequence starts later,
    so a lower target's scan may fail among candidates the higher one skips; the higher
    target is then reported infeasible too.

    With ``per_label`` (single-label policies only; a multi-label one is a ``ValueError``),
    each label with enough messages as the BERT top label gets a threshold of its own under the
    same guarantee, the rest sharing the global one (see the module docstring); the result's
    ``per_label`` says which labels got one and what each group certified.
    """
    if not 0.0 < target_accuracy <= 1.0:
        raise ValueError(f"target accuracy must lie in (0, 1], not {target_accuracy}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), not {confidence}")
    if llm_accuracy is not None:
        if per_label:
            raise ValueError("per-label thresholds guarantee accepted answers, not all messages")
        return _calibrate_over_all(
            predictions, gold, spec, target_accuracy, confidence, llm_accuracy
        )
    if per_label:
        return _calibrate_per_label(predictions, gold, spec, target_accuracy, confidence)
    sweep = _sweep(predictions, gold, spec)
    eligible_at = _eligible_from(sweep.accepted, confidence)
    tested, passed = _scan(sweep, eligible_at, 1.0 - target_accuracy, confidence)
    result = sweep.result(
        0 if passed is None else passed,
        goal=CalibrationGoal.ACCURACY,
        target=target_accuracy,
        multi_label=spec.multi_label,
        feasible=passed is not None,
        confidence=confidence,
    )
    if passed is not None:
        return result
    tests = []
    for index in tested:
        bound = sweep.upper_bounds(confidence, index + 1)[index]
        tail = binomial_cdf(sweep.errors[index], sweep.accepted[index], 1.0 - target_accuracy)
        tests.append(
            ThresholdTest(
                threshold=sweep.thresholds[index],
                accepted=sweep.accepted[index],
                errors=sweep.errors[index],
                error_upper_bound=bound,
                passed=tail <= 1.0 - confidence,
            )
        )
    return replace(
        result,
        tested=tuple(tests),
        highest_certifiable=_highest_certifiable(sweep, eligible_at, confidence),
        data_needed=_data_needed(sweep, target_accuracy, confidence),
    )


def allowed_accepted_error(target_accuracy: float, llm_share: float, llm_accuracy: float) -> float:
    """The accepted answers' error rate at which all messages are ``target_accuracy`` right.

    With a share ``s`` sent to an LLM right at the rate ``a``, the whole stream's accuracy is
    ``(1 - s) * (1 - e) + s * a``, at least the target ``t`` exactly when the accepted error
    ``e`` is at most ``(1 - t - s * (1 - a)) / (1 - s)``. Infinite when nothing is accepted and
    the LLM alone reaches the target, negative when it does not.
    """
    slack = 1.0 - target_accuracy - llm_share * (1.0 - llm_accuracy)
    if llm_share >= 1.0:
        return math.inf if slack >= 0.0 else -math.inf
    return slack / (1.0 - llm_share)


def _calibrate_over_all(
    predictions: Sequence[Prediction],
    gold: Sequence[Answer],
    spec: PolicySpec,
    target_accuracy: float,
    confidence: float,
    llm_accuracy: float,
) -> CalibrationResult:
    """:func:`calibrate_for_accuracy` with the guarantee over every message.

    Candidate ``i`` keeps ``accepted_i`` answers and sends the share ``s_i`` to the LLM; it
    passes when the exact binomial test rejects, at ``1 - confidence``, an accepted error rate
    above :func:`allowed_accepted_error` at ``s_i`` (so with probability ``confidence`` the
    whole stream, LLM answers at ``llm_accuracy``, is at least ``target_accuracy`` right). The
    sequence is the same fixed one, strictest first, each candidate joining once a third of its
    answers could pass with no errors; the scan stops at the first failure. Each hypothesis has
    its own allowed error, which fixed-sequence testing allows: the order and the levels depend
    on counts alone, never on which answers are right. When no candidate passes and the LLM
    alone reaches the target, everything goes to the LLM (``feasible``, LLM share 1); when it
    does not, the result is not feasible.
    """
    if not 0.0 < llm_accuracy <= 1.0:
        raise ValueError(f"LLM accuracy must lie in (0, 1], not {llm_accuracy}")
    sweep = _sweep(predictions, gold, spec)
    eligible_at = _eligible_from(sweep.accepted, confidence)
    passed: int | None = None
    tests: list[ThresholdTest] = []
    for index, (accepted, errors) in enumerate(zip(sweep.accepted, sweep.errors, strict=True)):
        allowed = allowed_accepted_error(target_accuracy, 1.0 - accepted / sweep.n, llm_accuracy)
        if not tests and (accepted == 0 or eligible_at[index] > allowed):
            continue  # the sequence has not started
        if allowed <= 0.0:
            tail = 1.0
        elif allowed >= 1.0:
            tail = 0.0
        else:
            tail = binomial_cdf(errors, accepted, allowed)
        tests.append(
            ThresholdTest(
                threshold=sweep.thresholds[index],
                accepted=accepted,
                errors=errors,
                error_upper_bound=sweep.upper_bounds(confidence, index + 1)[index],
                passed=tail <= 1.0 - confidence,
            )
        )
        if tail > 1.0 - confidence:
            break
        passed = index

    def result(index: int, *, feasible: bool) -> CalibrationResult:
        chosen = sweep.result(
            index,
            goal=CalibrationGoal.ACCURACY,
            target=target_accuracy,
            multi_label=spec.multi_label,
            feasible=feasible,
            confidence=confidence,
        )
        return replace(chosen, llm_accuracy=llm_accuracy)

    if passed is not None:
        return result(passed, feasible=True)
    strictest = result(0, feasible=False)
    if llm_accuracy >= target_accuracy:
        return replace(strictest.sending_everything(spec), feasible=True)
    return replace(strictest, tested=tuple(tests))


_STRICTEST_THRESHOLD = 1.0
"""The tuned number of :func:`everything_to_llm`'s rules (``min_probability``, or a band half-width
that covers every probability around any flag threshold)."""


def everything_to_llm(spec: PolicySpec) -> Escalation:
    """Escalation rules that send every answer but a one-hot one to the LLM (no threshold kept)."""
    return spec.escalation.model_copy(
        update={
            "min_probability": 1.0,
            "min_margin": 1.0,
            "band": Band(low=0.0, high=1.0),
            "per_label": {},
        }
    )


# --- Per-label thresholds ----------------------------------------------------------------------


def _group_confidence(confidence: float, groups: int) -> float:
    """The confidence of each of ``groups`` scans whose failures share ``1 - confidence``."""
    return 1.0 - (1.0 - confidence) / groups


def _split_labels(
    counts: dict[str, int], target_accuracy: float, confidence: float
) -> tuple[list[str], float, int | None]:
    """The labels that get a threshold of their own, each group's confidence, and its size.

    Labels are taken largest first: the most labels ``k`` such that the ``k`` largest, and the
    pooled rest when it has messages, each hold enough messages for their loosest threshold to
    join a scan at the per-group confidence (so no label leaves the pool if that would leave it
    too small to test). Only counts of top labels decide this, never whether answers are right.
    With no label split off, the size returned is what a split into two groups would need.
    """
    by_size = sorted(counts, key=lambda label: -counts[label])  # stable: ties in file order
    for k in range(len(by_size), 0, -1):
        rest = sum(counts[label] for label in by_size[k:])
        sizes = [counts[label] for label in by_size[:k]] + ([rest] if rest else [])
        if len(sizes) < 2:
            continue
        group_confidence = _group_confidence(confidence, len(sizes))
        needed = accepted_needed(0.0, target_accuracy, group_confidence)
        if needed is not None and min(sizes) >= needed:
            return by_size[:k], group_confidence, needed
    return [], confidence, accepted_needed(0.0, target_accuracy, _group_confidence(confidence, 2))


def _calibrate_group(
    labels: tuple[str, ...],
    messages: tuple[int, ...],
    predictions: Sequence[Prediction],
    wrong: npt.NDArray[np.int64],
    spec: PolicySpec,
    *,
    own_threshold: bool,
    allowed_error: float,
    confidence: float,
) -> LabelGroup:
    """One group's fixed sequence; a group that certifies nothing sends everything to the LLM.

    Its thresholds are then 1 on probability and margin, which only a one-hot prediction
    clears; such answers, if any, are counted as accepted.
    """
    threshold, accepted, errors, tested, certified = 1.0, 0, 0, 0, False
    last_test = None
    if predictions:
        sweep = _probability_sweep(predictions, wrong, spec)
        eligible_at = _eligible_from(sweep.accepted, confidence)
        scanned, passed = _scan(sweep, eligible_at, allowed_error, confidence)
        tested = len(scanned)
        if scanned:
            last = scanned[-1]
            last_test = ThresholdTest(
                threshold=sweep.thresholds[last],
                accepted=sweep.accepted[last],
                errors=sweep.errors[last],
                error_upper_bound=clopper_pearson_upper(
                    sweep.errors[last], sweep.accepted[last], confidence
                ),
                passed=binomial_cdf(sweep.errors[last], sweep.accepted[last], allowed_error)
                <= 1.0 - confidence,
            )
        if passed is not None:
            certified = True
            threshold = sweep.thresholds[passed]
            accepted, errors = sweep.accepted[passed], sweep.errors[passed]
        else:
            one_hot = np.array([p.top_probability >= 1.0 and p.margin >= 1.0 for p in predictions])
            accepted, errors = int(one_hot.sum()), int(wrong[one_hot].sum())
    return LabelGroup(
        labels=labels,
        messages=messages,
        own_threshold=own_threshold,
        threshold=threshold,
        accepted=accepted,
        errors=errors,
        error_upper_bound=clopper_pearson_upper(errors, accepted, confidence),
        certified=certified,
        tested=tested,
        last_test=last_test,
    )


def _per_label_escalation(spec: PolicySpec, groups: Sequence[LabelGroup]) -> Escalation:
    """The escalation rules of the groups: the pooled group's are the global ones."""

    def margin(group: LabelGroup) -> float:
        return 0.0 if group.certified else 1.0

    pooled = next((group for group in groups if not group.own_threshold), None)
    return spec.escalation.model_copy(
        update={
            "min_probability": 1.0 if pooled is None else pooled.threshold,
            "min_margin": 1.0 if pooled is None else margin(pooled),
            "per_label": {
                group.labels[0]: LabelThresholds(
                    min_probability=group.threshold, min_margin=margin(group)
                )
                for group in groups
                if group.own_threshold
            },
        }
    )


def _calibrate_per_label(
    predictions: Sequence[Prediction],
    gold: Sequence[Answer],
    spec: PolicySpec,
    target_accuracy: float,
    confidence: float,
) -> CalibrationResult:
    """:func:`calibrate_for_accuracy` with a threshold per label (see the module docstring)."""
    if spec.multi_label:
        raise ValueError(
            "per-label thresholds apply to single-label policies; a multi-label policy is "
            "calibrated with one band for every label"
        )
    check_answers(predictions, gold, spec)
    generated = set(spec.generation.labels)
    counts = {label: 0 for label in spec.label_names if label not in generated}
    tops = [prediction.top_label for prediction in predictions]
    for top in tops:
        if top in counts:
            counts[top] += 1
    own, group_confidence, needed = _split_labels(counts, target_accuracy, confidence)
    pooled = tuple(label for label in counts if label not in own)
    wrong = np.array(
        [bert_answer(p, spec) != g for p, g in zip(predictions, gold, strict=True)],
        dtype=np.int64,
    )
    plan: list[tuple[tuple[str, ...], bool]] = [((label,), True) for label in own]
    if pooled:
        plan.append((pooled, False))
    groups = []
    for labels, is_own in plan:
        members = [i for i, top in enumerate(tops) if top in labels]
        groups.append(
            _calibrate_group(
                labels,
                tuple(counts[label] for label in labels),
                [predictions[i] for i in members],
                wrong[members],
                spec,
                own_threshold=is_own,
                allowed_error=1.0 - target_accuracy,
                confidence=group_confidence,
            )
        )
    n = len(predictions)
    accepted = sum(group.accepted for group in groups)
    errors = sum(group.errors for group in groups)
    certified = [group for group in groups if group.certified]
    result = CalibrationResult(
        escalation=_per_label_escalation(spec, groups),
        goal=CalibrationGoal.ACCURACY,
        target=target_accuracy,
        n=n,
        multi_label=False,
        threshold=next((g.threshold for g in groups if not g.own_threshold), 1.0),
        accepted_share=accepted / n,
        llm_share=(n - accepted) / n,
        accepted_accuracy=(accepted - errors) / accepted if accepted else None,
        error_upper_bound=max(
            (group.error_upper_bound for group in certified),
            default=clopper_pearson_upper(errors, accepted, confidence),
        ),
        confidence=confidence,
        feasible=bool(certified),
        per_label=PerLabelCalibration(tuple(groups), group_confidence, needed),
    )
    if certified or own:
        return result
    # one group, tested as the global calibration tests it: that explains the failure
    explained = calibrate_for_accuracy(predictions, gold, spec, target_accuracy, confidence)
    return replace(
        result,
        tested=explained.tested,
        highest_certifiable=explained.highest_certifiable,
        data_needed=explained.data_needed,
    )


def calibrate_for_llm_share(
    predictions: Sequence[Prediction],
    gold: Sequence[Answer],
    spec: PolicySpec,
    target_share: float,
) -> CalibrationResult:
    """The thresholds whose share of messages sent to the LLM is closest to, not above, a target.

    That is the strictest candidate sending at most ``target_share`` of the messages. When
    even the loosest sends more (labels that need generated text can force that), it is
    returned with ``feasible=False``. ``gold`` is used only to report the accepted accuracy.
    """
    if not 0.0 <= target_share <= 1.0:
        raise ValueError(f"target share must lie in [0, 1], not {target_share}")
    sweep = _sweep(predictions, gold, spec)
    # in whole messages, with a hair of slack so that 0.3 * 10 = 3.0000000000000004 admits 3
    allowance = target_share * sweep.n + 1e-9
    within = [i for i, accepted in enumerate(sweep.accepted) if sweep.n - accepted <= allowance]
    return sweep.result(
        within[0] if within else len(sweep.accepted) - 1,
        goal=CalibrationGoal.LLM_SHARE,
        target=target_share,
        multi_label=spec.multi_label,
        feasible=bool(within),
        confidence=None,
    )
