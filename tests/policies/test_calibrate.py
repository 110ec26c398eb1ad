"""Threshold calibration: Clopper-Pearson, fixed-sequence testing, and agreement with ``decide``."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiergate.policies.calibrate import (
    CalibrationGoal,
    accepted_needed,
    binomial_cdf,
    calibrate_for_accuracy,
    calibrate_for_llm_share,
    clopper_pearson_upper,
    regularized_incomplete_beta,
)
from tiergate.policies.prediction import Prediction
from tiergate.policies.routing import Target, decide
from tiergate.policies.spec import (
    Band,
    Escalation,
    Generation,
    LabelSpec,
    LabelThresholds,
    PolicyError,
    PolicySpec,
)

LABELS = ("a", "b", "c")


def _spec(*, multi_label: bool = False, **changes) -> PolicySpec:
    spec = PolicySpec(
        name="p",
        version="1",
        multi_label=multi_label,
        labels=[LabelSpec(name=n) for n in LABELS],
    )
    return spec.model_copy(update=changes)


def _single(top: str, probability: float) -> Prediction:
    """A single-label prediction with ``top`` at ``probability`` and the rest split evenly."""
    rest = (1.0 - probability) / (len(LABELS) - 1)
    return Prediction(
        labels=LABELS,
        probabilities=tuple(probability if label == top else rest for label in LABELS),
        multi_label=False,
        chunks=1,
        model_version="test",
    )


def _multi(*probabilities: float) -> Prediction:
    return Prediction(
        labels=LABELS, probabilities=probabilities, multi_label=True, chunks=1, model_version="test"
    )


def synthetic_single(rng: np.random.Generator, n: int, low: float = 0.34):
    """Calibrated single-label data: top-1 probability ~ U(low, 1), right with that probability."""
    confidence = rng.uniform(low, 1.0, n)
    right = rng.random(n) < confidence
    tops = rng.integers(0, len(LABELS), n)
    predictions, gold = [], []
    for c, ok, top in zip(confidence, right, tops, strict=True):
        label = LABELS[top]
        predictions.append(_single(label, float(c)))
        gold.append(label if ok else LABELS[(top + 1) % len(LABELS)])
    return predictions, gold


def true_accepted_error(threshold: float, low: float = 0.34) -> float:
    """The population error of accepted answers of :func:`synthetic_single` at a threshold."""
    start = max(threshold, low)
    return (1.0 - start) / 2.0  # mean of 1 - c for c ~ U(start, 1)


def accepted_by_decide(predictions, gold, spec):
    """Accepted share and accuracy of accepted answers, counted by routing with ``decide``."""
    accepted = right = 0
    for prediction, answer in zip(predictions, gold, strict=True):
        if decide(prediction, spec).target is Target.BERT:
            accepted += 1
            if spec.multi_label:
                right += (
                    frozenset(prediction.labels_above(spec.escalation.flag_threshold)) == answer
                )
            else:
                right += prediction.top_label == answer
    return accepted / len(predictions), (right / accepted if accepted else None)


def exact_binomial_cdf(k: int, n: int, p: Fraction) -> Fraction:
    """P(X <= k) for X ~ Binomial(n, p), summed in exact rational arithmetic."""
    return sum((math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1)), Fraction(0))


# --- Clopper-Pearson ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("errors", "n", "confidence", "expected"),
    [
        # two-sided 95% intervals of textbook tables are one-sided 97.5% upper bounds
        (0, 10, 0.975, 0.3085),
        (1, 10, 0.975, 0.4450),
        (5, 10, 0.975, 0.8129),
        (1, 10, 0.95, 0.3942),
        (3, 50, 0.95, 0.1478),
        (50, 1000, 0.95, 0.06286),
    ],
)
def test_clopper_pearson_matches_textbook_values(errors, n, confidence, expected):
    """The upper bound matches published Clopper-Pearson values to four digits."""
    assert clopper_pearson_upper(errors, n, confidence) == pytest.approx(expected, abs=5e-5)


@given(st.integers(1, 5000), st.floats(0.5, 0.999))
def test_clopper_pearson_with_no_errors_has_the_closed_form(n, confidence):
    """Zero errors of n gives 1 - (1 - confidence)^(1/n)."""
    expected = 1.0 - (1.0 - confidence) ** (1.0 / n)
    assert clopper_pearson_upper(0, n, confidence) == pytest.approx(expected, rel=1e-9, abs=1e-11)


@settings(max_examples=60)
@given(st.integers(1, 60), st.data(), st.sampled_from([0.8, 0.9, 0.95, 0.99]))
def test_clopper_pearson_bound_solves_the_exact_binomial_tail(n, data, confidence):
    """At the bound, the exact binomial tail P(X <= errors) equals 1 - confidence."""
    errors = data.draw(st.integers(0, n - 1))
    bound = clopper_pearson_upper(errors, n, confidence)
    tail = exact_binomial_cdf(errors, n, Fraction(bound))
    assert float(tail) == pytest.approx(1.0 - confidence, abs=1e-9)


@given(st.integers(1, 400), st.data())
def test_clopper_pearson_rises_with_errors_and_covers_the_observed_rate(n, data):
    """More errors of the same n never lower the bound, and the bound is above errors / n."""
    errors = data.draw(st.integers(0, n - 1))
    low, high = clopper_pearson_upper(errors, n), clopper_pearson_upper(errors + 1, n)
    assert errors / n < low < high <= 1.0


def test_clopper_pearson_without_evidence_is_one():
    """All errors, or no observations at all, bound the error rate by 1."""
    assert clopper_pearson_upper(4, 4) == 1.0
    assert clopper_pearson_upper(0, 0) == 1.0


def test_binomial_cdf_and_incomplete_beta_edges():
    """The tail is 0 below 0 errors and 1 at n; the incomplete beta is 0 and 1 at its ends."""
    assert binomial_cdf(-1, 5, 0.3) == 0.0
    assert binomial_cdf(5, 5, 0.3) == 1.0
    assert binomial_cdf(2, 5, Fraction(3, 10)) == pytest.approx(
        float(exact_binomial_cdf(2, 5, Fraction(3, 10))), rel=1e-12
    )
    assert regularized_incomplete_beta(2.0, 3.0, 0.0) == 0.0
    assert regularized_incomplete_beta(2.0, 3.0, 1.0) == 1.0
    with pytest.raises(ValueError, match="confidence"):
        clopper_pearson_upper(1, 10, 1.0)


# --- calibrate for accuracy ---------------------------------------------------------------------


def test_accuracy_calibration_certifies_its_accepted_answers():
    """The chosen threshold's accepted answers, routed by decide, have the claimed accuracy."""
    predictions, gold = synthetic_single(np.random.default_rng(7), 1500)
    spec = _spec(
        escalation=Escalation(
            min_probability=0.2, min_margin=0.4, per_label={"a": LabelThresholds(min_margin=0.9)}
        )
    )
    result = calibrate_for_accuracy(predictions, gold, spec, target_accuracy=0.85)
    assert result.feasible
    assert result.goal is CalibrationGoal.ACCURACY
    assert result.error_upper_bound is not None
    assert result.error_upper_bound <= 0.15 + 1e-9
    calibrated = result.policy(spec)
    assert calibrated.escalation.min_probability == result.threshold
    assert calibrated.escalation.min_margin == 0.0
    assert calibrated.escalation.per_label == {}
    share, accuracy = accepted_by_decide(predictions, gold, calibrated)
    assert share == pytest.approx(result.accepted_share)
    assert accuracy == pytest.approx(result.accepted_accuracy)
    assert accuracy is not None
    assert accuracy >= 0.85
    assert result.accepted_share + result.llm_share == pytest.approx(1.0)
    # the loosest passing threshold: the next looser candidate would not be certified
    looser = max(p.top_probability for p in predictions if p.top_probability < result.threshold)
    next_spec = _spec(escalation=Escalation(min_probability=looser))
    looser_share, looser_accuracy = accepted_by_decide(predictions, gold, next_spec)
    looser_errors = round((1 - looser_accuracy) * looser_share * len(predictions))
    looser_n = round(looser_share * len(predictions))
    assert clopper_pearson_upper(looser_errors, looser_n) > 0.15


def test_accuracy_calibration_rarely_certifies_a_threshold_that_misses_the_target():
    """Over 200 fresh calibration sets, the true accepted error exceeds 1 - target at most ~5%."""
    rng = np.random.default_rng(2024)
    spec = _spec()
    violations = certified = 0
    repetitions = 200
    for _ in range(repetitions):
        predictions, gold = synthetic_single(rng, 1000)
        result = calibrate_for_accuracy(predictions, gold, spec, 0.85, confidence=0.95)
        certified += result.feasible
        violations += result.feasible and true_accepted_error(result.threshold) > 0.15
    assert certified >= 0.9 * repetitions  # the target is reachable on this data
    # 5% plus three binomial standard errors of slack
    assert violations / repetitions <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / repetitions)


def test_accuracy_calibration_with_an_unreachable_target_is_infeasible():
    """A target no threshold can certify gives feasible=False and the strictest threshold."""
    predictions, gold = synthetic_single(np.random.default_rng(3), 200)
    result = calibrate_for_accuracy(predictions, gold, _spec(), target_accuracy=0.999)
    assert not result.feasible
    assert result.threshold == max(p.top_probability for p in predictions)
    assert result.llm_share > 0.95
    assert calibrate_for_accuracy(predictions, gold, _spec(), 1.0).feasible is False


@st.composite
def labelled_single(draw, max_size: int = 40):
    """Small single-label sets with few distinct probabilities, so ties are common."""
    size = draw(st.integers(1, max_size))
    rows = draw(
        st.lists(
            st.tuples(
                st.sampled_from(LABELS),
                st.sampled_from([0.4, 0.5, 0.7, 0.9, 0.99, 1.0]),
                st.sampled_from(LABELS),
            ),
            min_size=size,
            max_size=size,
        )
    )
    return [_single(top, p) for top, p, _ in rows], [g for *_, g in rows]


@settings(max_examples=60)
@given(labelled_single(), st.floats(0.3, 0.95), st.floats(0.3, 0.95))
def test_raising_the_accuracy_target_never_lowers_the_threshold(data, first, second):
    """A stricter accuracy target gives a threshold at least as strict."""
    predictions, gold = data
    low, high = sorted((first, second))
    at_low = calibrate_for_accuracy(predictions, gold, _spec(), low, confidence=0.8)
    at_high = calibrate_for_accuracy(predictions, gold, _spec(), high, confidence=0.8)
    assert at_high.threshold >= at_low.threshold
    assert at_high.llm_share >= at_low.llm_share


def test_generation_labels_count_as_sent_and_never_as_accepted():
    """Messages whose top label needs generated text are sent under every threshold."""
    predictions = [_single("a", 0.99)] * 5 + [_single("b", 0.9)] * 5
    gold = ["a"] * 5 + ["b"] * 5
    spec = _spec(generation=Generation(labels=["a"]))
    result = calibrate_for_llm_share(predictions, gold, spec, target_share=0.0)
    assert not result.feasible
    assert result.llm_share == 0.5
    assert result.accepted_accuracy == 1.0
    assert accepted_by_decide(predictions, gold, result.policy(spec))[0] == 0.5


# --- calibrate for LLM share --------------------------------------------------------------------


@pytest.mark.parametrize("target", [0.0, 0.1, 0.25, 0.5, 0.83, 1.0])
def test_share_calibration_reaches_the_target_from_below(target):
    """The achieved LLM share is at most the target and within one message of it."""
    predictions, gold = synthetic_single(np.random.default_rng(11), 400)
    result = calibrate_for_llm_share(predictions, gold, _spec(), target)
    assert result.feasible
    assert result.goal is CalibrationGoal.LLM_SHARE
    assert result.error_upper_bound is None
    assert target - 1 / 400 - 1e-12 <= result.llm_share <= target + 1e-12
    share, _ = accepted_by_decide(predictions, gold, result.policy(_spec()))
    assert 1 - share == pytest.approx(result.llm_share)


# --- multi-label --------------------------------------------------------------------------------

probabilities = st.sampled_from([0.0, 0.1, 0.3, 0.45, 0.5, 0.55, 0.7, 0.9, 1.0]) | st.floats(0, 1)


@st.composite
def labelled_multi(draw):
    """Small multi-label sets whose probabilities often sit on band edges."""
    size = draw(st.integers(1, 25))
    predictions = [
        _multi(*draw(st.tuples(probabilities, probabilities, probabilities))) for _ in range(size)
    ]
    gold = [frozenset(draw(st.sets(st.sampled_from(LABELS), max_size=3))) for _ in range(size)]
    return predictions, gold


@settings(max_examples=80)
@given(
    labelled_multi(),
    st.sampled_from([0.3, 0.5, 0.6]),
    st.floats(0, 1),
    st.booleans(),
)
def test_multi_label_calibration_agrees_with_decide(data, flag, target, with_generation):
    """The band chosen for a share or an accuracy accepts exactly what decide lets stand."""
    predictions, gold = data
    spec = _spec(
        multi_label=True,
        escalation=Escalation(
            flag_threshold=flag, per_label={"b": LabelThresholds(band=Band(low=0.0, high=1.0))}
        ),
        generation=Generation(labels=["c"] if with_generation else []),
    )
    for result in (
        calibrate_for_llm_share(predictions, gold, spec, target),
        calibrate_for_accuracy(predictions, gold, spec, max(target, 0.05), confidence=0.6),
    ):
        calibrated = result.policy(spec)
        assert calibrated.escalation.per_label == {}
        band = calibrated.escalation.band
        assert band.low == max(0.0, flag - result.threshold)
        assert band.high == min(1.0, flag + result.threshold)
        share, accuracy = accepted_by_decide(predictions, gold, calibrated)
        assert share == pytest.approx(result.accepted_share)
        if result.accepted_accuracy is None:
            assert accuracy is None
        else:
            assert accuracy == pytest.approx(result.accepted_accuracy)
        if result.goal is CalibrationGoal.LLM_SHARE and result.feasible:
            assert result.llm_share <= target + 1e-9


@settings(max_examples=40)
@given(labelled_multi(), st.floats(0.3, 0.95), st.floats(0.3, 0.95))
def test_raising_the_accuracy_target_never_narrows_the_band(data, first, second):
    """For multi-label policies a stricter accuracy target gives a band at least as wide."""
    predictions, gold = data
    low, high = sorted((first, second))
    spec = _spec(multi_label=True)
    at_low = calibrate_for_accuracy(predictions, gold, spec, low, confidence=0.7)
    at_high = calibrate_for_accuracy(predictions, gold, spec, high, confidence=0.7)
    assert at_high.threshold >= at_low.threshold


def test_multi_label_accuracy_calibration_widens_the_band_until_certified():
    """Borderline messages are the wrong ones; the band grows just enough to send them."""
    rng = np.random.default_rng(5)
    predictions, gold = [], []
    for _ in range(600):
        scores = rng.uniform(0, 1, 3)
        prediction = _multi(*map(float, scores))
        flagged = set(prediction.labels_above(0.5))
        # labels within 0.1 of the threshold are wrong half the time
        for label, p in zip(LABELS, scores, strict=True):
            if abs(p - 0.5) < 0.1 and rng.random() < 0.5:
                flagged ^= {label}
        predictions.append(prediction)
        gold.append(frozenset(flagged))
    spec = _spec(multi_label=True)
    result = calibrate_for_accuracy(predictions, gold, spec, target_accuracy=0.97)
    assert result.feasible
    assert 0.09 <= result.threshold <= 0.2
    assert result.accepted_accuracy is not None
    assert result.accepted_accuracy >= 0.97
    assert result.error_upper_bound is not None
    assert result.error_upper_bound <= 0.03 + 1e-9


# --- the calibrated policy ----------------------------------------------------------------------


def test_calibrated_version_is_deterministic_and_not_stacked():
    """Same thresholds give the same +cal.<hash> version; recalibrating replaces the suffix."""
    predictions, gold = synthetic_single(np.random.default_rng(1), 100)
    spec = _spec(version="2024.1")
    first = calibrate_for_llm_share(predictions, gold, spec, 0.3)
    again = calibrate_for_llm_share(predictions, gold, spec, 0.3)
    other = calibrate_for_llm_share(predictions, gold, spec, 0.6)
    version = first.policy(spec).version
    assert version.startswith("2024.1+cal.")
    assert len(version) == len("2024.1+cal.") + 8
    assert again.policy(spec).version == version
    assert other.policy(spec).version != version
    assert first.policy(other.policy(spec)).version == version
    assert first.to_dict()["escalation"]["min_probability"] == first.threshold
    with pytest.raises(PolicyError, match="version"):
        first.policy(_spec(version="v" * 60))


def test_inputs_that_do_not_fit_are_rejected():
    """Mismatched lengths, a gold set for a single-label policy, and bad targets are errors."""
    predictions, gold = synthetic_single(np.random.default_rng(1), 5)
    with pytest.raises(ValueError, match="gold"):
        calibrate_for_llm_share(predictions, gold[:4], _spec(), 0.5)
    with pytest.raises(TypeError, match="needs a str"):
        calibrate_for_llm_share(predictions, [frozenset({"a"})] * 5, _spec(), 0.5)
    with pytest.raises(ValueError, match="multi-label head"):
        calibrate_for_llm_share(predictions, gold, _spec(multi_label=True), 0.5)
    with pytest.raises(ValueError, match="target"):
        calibrate_for_accuracy(predictions, gold, _spec(), 0.0)
    with pytest.raises(ValueError, match="no predictions"):
        calibrate_for_accuracy([], [], _spec(), 0.9)


# --- what an unreached accuracy target needs ----------------------------------------------------


def test_accepted_needed_matches_hand_computed_counts():
    """0 errors: 299 answers bound the error by 1%, but joining the sequence takes 3x (895)."""
    assert clopper_pearson_upper(0, 298) > 0.01 >= clopper_pearson_upper(0, 299)
    assert accepted_needed(0.0, 0.99, 0.95) == 895  # ceil(3 * ln 0.05 / ln 0.99)
    assert accepted_needed(0.0, 0.98, 0.95) == 445  # so 444 messages never certify 98%
    # at 0.5% wrong the bound is what matters: 5 of 1000 misses 1%, 6 of 1200 reaches it
    assert clopper_pearson_upper(5, 1000) > 0.01 >= clopper_pearson_upper(6, 1200)
    assert 1000 < accepted_needed(0.005, 0.99, 0.95) <= 1200
    assert accepted_needed(0.01, 0.99) is None  # the error rate is the allowed one
    assert accepted_needed(0.0, 1.0) is None  # no finite sample certifies zero error


def test_unreached_target_tests_no_threshold_that_keeps_too_few_answers():
    """200 messages cannot certify 99.9%: nothing tested; the highest target and the need are."""
    predictions, gold = synthetic_single(np.random.default_rng(3), 200)
    spec = _spec()
    result = calibrate_for_accuracy(predictions, gold, spec, target_accuracy=0.999)
    assert not result.feasible
    assert result.tested == ()  # entering the sequence takes 8,986 accepted answers
    highest = result.highest_certifiable
    assert highest is not None
    assert calibrate_for_accuracy(predictions, gold, spec, highest - 1e-9).feasible
    assert not calibrate_for_accuracy(predictions, gold, spec, highest + 1e-9).feasible
    need = result.data_needed
    assert need is not None
    assert need.messages is not None
    assert need.accepted is not None
    assert need.accepted >= accepted_needed(0.0, 0.999)
    assert need.accepted == accepted_needed(need.error_rate, 0.999)
    assert need.messages == math.ceil(need.accepted / need.accepted_share - 1e-9)
    share, accuracy = accepted_by_decide(
        predictions, gold, _spec(escalation=Escalation(min_probability=need.threshold))
    )
    assert share == pytest.approx(need.accepted_share)
    assert 1 - accuracy == pytest.approx(need.error_rate)
    document = result.to_dict()
    assert document["tested"] == []
    assert document["data_needed"]["messages"] == need.messages


def test_unreached_target_lists_the_thresholds_tested_with_their_real_counts():
    """1000 answers at 90% accuracy: the one threshold is tested and fails; no data would do."""
    predictions = [_single("a", 0.9)] * 1000
    gold = ["a"] * 900 + ["b"] * 100
    result = calibrate_for_accuracy(predictions, gold, _spec(), target_accuracy=0.99)
    assert not result.feasible
    assert len(result.tested) == 1
    test = result.tested[0]
    assert (test.threshold, test.accepted, test.errors, test.passed) == (0.9, 1000, 100, False)
    assert test.error_upper_bound == clopper_pearson_upper(100, 1000)
    assert result.highest_certifiable == pytest.approx(1 - clopper_pearson_upper(100, 1000))
    need = result.data_needed
    assert need is not None
    assert need.messages is None  # 10% wrong can never certify a 1% error
    assert need.error_rate == pytest.approx(0.1)
    assert calibrate_for_accuracy(predictions, gold, _spec(), 0.85).feasible


@settings(max_examples=60)
@given(labelled_single(), st.floats(0.3, 0.999))
def test_highest_certifiable_target_is_exactly_the_one_calibration_reaches(data, target):
    """Just below the reported highest target is certified, just above it is not."""
    predictions, gold = data
    result = calibrate_for_accuracy(predictions, gold, _spec(), target, confidence=0.8)
    if result.feasible:
        assert result.highest_certifiable is None
        return
    highest = result.highest_certifiable
    if highest is None:
        assert not calibrate_for_accuracy(predictions, gold, _spec(), 1e-6, 0.8).feasible
        return
    assert highest < target
    assert calibrate_for_accuracy(predictions, gold, _spec(), highest - 1e-9, 0.8).feasible
    assert not calibrate_for_accuracy(predictions, gold, _spec(), highest + 1e-9, 0.8).feasible
