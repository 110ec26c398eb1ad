"""Threshold calibration: Clopper-Pearson, fixed-sequence testing, and agreement with ``decide``."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiergate.policies.calibrate import (
    CalibrationGoal,
    accepted_needed,
    allowed_accepted_error,
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
    load_policy,
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


# --- per-label thresholds -----------------------------------------------------------------------


def labelled_by_label(rng: np.random.Generator, sizes: dict[str, int], right_given) -> tuple:
    """Per label, ``size`` predictions with top-1 ~ U(0.34, 1), right with ``right_given[label]``.

    ``right_given[label]`` maps an array of top-1 probabilities to the chance each is right.
    """
    predictions, gold = [], []
    for label, size in sizes.items():
        confidence = rng.uniform(0.34, 1.0, size)
        right = rng.random(size) < right_given[label](confidence)
        wrong_label = LABELS[(LABELS.index(label) + 1) % len(LABELS)]
        for c, ok in zip(confidence, right, strict=True):
            predictions.append(_single(label, float(c)))
            gold.append(label if ok else wrong_label)
    return predictions, gold


def calibrated(c):
    """Right with probability c: the top-1 probability is the true accuracy."""
    return c


def noisy(c):
    """Wrong 1.6 times as often as the top-1 probability says: 0.8 (1 - s) above a threshold s."""
    return np.clip(1.0 - 1.6 * (1.0 - c), 0.0, 1.0)


def population_error(threshold: float, right_given, low: float = 0.34) -> tuple[float, float]:
    """Acceptance probability and error of accepted answers, for top-1 ~ U(low, 1), at a threshold.

    Averaged over a fine grid of top-1 probabilities above the threshold.
    """
    if threshold >= 1.0:
        return 0.0, 0.0
    start = max(threshold, low)
    grid = np.linspace(start, 1.0, 20_001)
    return (1.0 - start) / (1.0 - low), float(1.0 - np.mean(right_given(grid)))


def test_per_label_calibration_gives_a_noisy_label_a_stricter_threshold():
    """A label whose answers are less reliable than their probability gets a stricter threshold."""
    predictions, gold = labelled_by_label(
        np.random.default_rng(0), {"a": 1500, "b": 1500}, {"a": calibrated, "b": noisy}
    )
    spec = _spec()
    result = calibrate_for_accuracy(predictions, gold, spec, 0.85, per_label=True)
    assert result.feasible
    assert result.per_label is not None
    own = {group.labels[0]: group for group in result.per_label.own}
    assert set(own) == {"a", "b"}
    assert own["a"].certified
    assert own["b"].certified
    assert own["b"].threshold > own["a"].threshold + 0.05
    # population thresholds: a needs c >= 0.7, b c >= 0.8125 (each with slack for the bound)
    assert 0.7 <= own["a"].threshold < 0.8
    assert 0.8125 <= own["b"].threshold < 0.92
    # "c" predicted nothing: it keeps the global threshold, which certifies nothing and escalates
    assert result.per_label.pooled == result.per_label.groups[-1]
    assert result.per_label.pooled.labels == ("c",)
    assert result.per_label.pooled.messages == (0,)
    policy = result.policy(spec)
    assert policy.escalation.per_label == {
        "a": LabelThresholds(min_probability=own["a"].threshold, min_margin=0.0),
        "b": LabelThresholds(min_probability=own["b"].threshold, min_margin=0.0),
    }
    assert (policy.escalation.min_probability, policy.escalation.min_margin) == (1.0, 1.0)
    share, accuracy = accepted_by_decide(predictions, gold, policy)
    assert share == pytest.approx(result.accepted_share)
    assert accuracy == pytest.approx(result.accepted_accuracy)


def test_per_label_groups_are_tested_at_a_bonferroni_split_confidence(tmp_path):
    """Two groups at 95% overall are each tested at 97.5%; the written policy loads and routes."""
    predictions, gold = labelled_by_label(
        np.random.default_rng(8), {"a": 800, "b": 800}, {"a": calibrated, "b": noisy}
    )
    spec = _spec()
    result = calibrate_for_accuracy(predictions, gold, spec, 0.85, confidence=0.95, per_label=True)
    assert result.per_label is not None
    assert result.per_label.group_confidence == pytest.approx(0.975)
    assert result.per_label.messages_needed == 69  # ceil(3 ln 0.025 / ln 0.85) = ceil(68.1)
    for group in result.per_label.own:
        assert group.certified
        bound = clopper_pearson_upper(group.errors, group.accepted, 0.975)
        assert group.error_upper_bound == bound
        assert bound <= 0.15
    assert result.error_upper_bound == max(g.error_upper_bound for g in result.per_label.own)
    path = tmp_path / "calibrated.yaml"
    path.write_text(result.policy(spec).to_yaml())
    loaded = load_policy(path)
    assert loaded == result.policy(spec)
    share, accuracy = accepted_by_decide(predictions, gold, loaded)
    assert share == pytest.approx(result.accepted_share)
    assert accuracy == pytest.approx(result.accepted_accuracy)
    document = json.loads(json.dumps(result.to_dict()))
    assert [g["labels"] for g in document["per_label"]["groups"]] == [["a"], ["b"], ["c"]]


def test_labels_with_too_few_messages_keep_the_global_threshold():
    """60 messages of "c" cannot be tested alone at 85%: it shares the pooled, global threshold.

    Three groups would each need 76 messages, so "b" stays pooled with "c" (two groups need 69
    each) rather than leave "c" too small to test.
    """
    predictions, gold = labelled_by_label(
        np.random.default_rng(9),
        {"a": 1000, "b": 1000, "c": 60},
        {"a": calibrated, "b": calibrated, "c": calibrated},
    )
    assert accepted_needed(0.0, 0.85, 1 - 0.05 / 3) == 76
    spec = _spec()
    result = calibrate_for_accuracy(predictions, gold, spec, 0.85, per_label=True)
    assert result.per_label is not None
    assert [group.labels for group in result.per_label.own] == [("a",)]
    pooled = result.per_label.pooled
    assert pooled is not None
    assert (pooled.labels, pooled.messages) == (("b", "c"), (1000, 60))
    assert pooled.messages[1] < result.per_label.messages_needed
    assert pooled.certified
    policy = result.policy(spec)
    assert set(policy.escalation.per_label) == {"a"}
    assert policy.escalation.min_probability == pooled.threshold == result.threshold
    assert decide(_single("c", pooled.threshold), policy).target is Target.BERT
    assert decide(_single("c", pooled.threshold - 1e-6), policy).target is Target.LLM


def test_a_label_that_certifies_nothing_on_its_own_always_goes_to_the_llm():
    """A label 30% wrong at every probability fails its own scan; all its messages escalate."""
    predictions, gold = labelled_by_label(
        np.random.default_rng(10),
        {"a": 1000, "b": 1000},
        {"a": calibrated, "b": lambda c: np.full_like(c, 0.7)},
    )
    spec = _spec()
    result = calibrate_for_accuracy(predictions, gold, spec, 0.85, per_label=True)
    assert result.feasible  # "a" is certified
    assert result.per_label is not None
    own = {group.labels[0]: group for group in result.per_label.own}
    assert own["a"].certified
    assert not own["b"].certified
    assert (own["b"].threshold, own["b"].accepted, own["b"].errors) == (1.0, 0, 0)
    policy = result.policy(spec)
    assert policy.escalation.per_label["b"] == LabelThresholds(min_probability=1.0, min_margin=1.0)
    assert all(decide(p, policy).target is Target.LLM for p in predictions if p.top_label == "b")
    assert result.error_upper_bound == own["a"].error_upper_bound


def test_per_label_calibration_without_enough_data_is_the_global_one():
    """60 messages besides "a" cannot form a group of 69: the result is the global one."""
    predictions, gold = labelled_by_label(
        np.random.default_rng(3),
        {"a": 900, "b": 30, "c": 30},
        {"a": calibrated, "b": calibrated, "c": calibrated},
    )
    spec = _spec()
    for target in (0.85, 0.999):
        single = calibrate_for_accuracy(predictions, gold, spec, target)
        split = calibrate_for_accuracy(predictions, gold, spec, target, per_label=True)
        assert split.per_label is not None
        assert split.per_label.own == ()
        assert split.per_label.pooled is not None
        assert split.per_label.pooled.labels == LABELS
        assert split.per_label.group_confidence == 0.95
        assert split.feasible == single.feasible == (target < 0.9)
        assert split.tested == single.tested
        assert split.highest_certifiable == single.highest_certifiable
        if single.feasible:
            assert split.escalation == single.escalation
            assert split.policy(spec).version == single.policy(spec).version


@settings(max_examples=40)
@given(st.data(), st.floats(0.6, 0.9))
def test_per_label_groups_depend_on_the_top_labels_only(data, target):
    """Any gold labels give the same groups: the split is fixed before the tests see errors."""
    sizes = {label: data.draw(st.integers(0, 120)) for label in LABELS}
    predictions = [_single(label, 0.9) for label, size in sizes.items() for _ in range(size)]
    if not predictions:
        return
    golds = st.lists(st.sampled_from(LABELS), min_size=len(predictions), max_size=len(predictions))
    groups = [
        calibrate_for_accuracy(
            predictions, data.draw(golds), _spec(), target, per_label=True
        ).per_label
        for _ in range(2)
    ]
    assert [g.labels for g in groups[0].groups] == [g.labels for g in groups[1].groups]
    assert groups[0].group_confidence == groups[1].group_confidence


def test_per_label_calibration_rarely_certifies_a_policy_that_misses_the_target():
    """Over 200 fresh sets, the per-label policy's true accepted error exceeds 15% at most ~5%."""
    rng = np.random.default_rng(2025)
    spec = _spec()
    curves = {"a": calibrated, "b": noisy}
    violations = certified = 0
    repetitions = 200
    for _ in range(repetitions):
        predictions, gold = labelled_by_label(rng, {"a": 500, "b": 500}, curves)
        result = calibrate_for_accuracy(predictions, gold, spec, 0.85, per_label=True)
        assert result.per_label is not None
        certified += result.feasible
        accepted = wrong = 0.0
        for group in result.per_label.own:
            share, error = population_error(group.threshold, curves[group.labels[0]])
            accepted += share
            wrong += share * error
        violations += result.feasible and wrong / accepted > 0.15
    assert certified >= 0.8 * repetitions
    assert violations / repetitions <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / repetitions)


def test_per_label_thresholds_are_refused_for_a_multi_label_policy():
    """A multi-label policy has one band for all labels: per_label=True is a ValueError."""
    predictions = [_multi(0.9, 0.1, 0.2)] * 10
    gold = [frozenset({"a"})] * 10
    with pytest.raises(ValueError, match="single-label policies"):
        calibrate_for_accuracy(predictions, gold, _spec(multi_label=True), 0.8, per_label=True)


# --- accuracy over all messages ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "share", "llm", "expected"),
    [
        (0.9, 0.5, 0.95, 0.15),  # (0.1 - 0.5 * 0.05) / 0.5
        (0.9, 0.0, 0.95, 0.1),  # nothing sent: the accepted-only allowance
        (0.9, 0.2, 0.8, 0.075),  # (0.1 - 0.2 * 0.2) / 0.8
        (0.9, 0.5, 0.8, 0.0),  # the LLM's misses use up the whole allowance
        (0.9, 0.5, 0.7, -0.1),  # (0.1 - 0.5 * 0.3) / 0.5: even perfect answers fall short
        (0.9, 0.3, 0.9, 0.1),  # an LLM right at the target leaves 1 - target at any share
        (0.9, 1.0, 0.95, math.inf),
        (0.9, 1.0, 0.9, math.inf),
        (0.9, 1.0, 0.85, -math.inf),
    ],
)
def test_allowed_accepted_error_matches_hand_computed_values(target, share, llm, expected):
    """The accepted error at which the whole stream is exactly on target, by hand."""
    assert allowed_accepted_error(target, share, llm) == pytest.approx(expected, abs=1e-12)


def whole_stream_accuracy(predictions, gold, spec, llm_accuracy: float) -> float:
    """Accepted answers right as routed by ``decide``, plus the LLM's share at ``llm_accuracy``."""
    share, accuracy = accepted_by_decide(predictions, gold, spec)
    return share * (accuracy or 0.0) + (1.0 - share) * llm_accuracy


def test_over_all_scope_keeps_more_answers_when_the_llm_beats_the_target():
    """With the LLM at 95% and a 90% target, answers under 90% right may stand: fewer go out."""
    predictions, gold = synthetic_single(np.random.default_rng(1), 1500)
    spec = _spec()
    accepted_only = calibrate_for_accuracy(predictions, gold, spec, 0.9)
    over_all = calibrate_for_accuracy(predictions, gold, spec, 0.9, llm_accuracy=0.95)
    assert accepted_only.feasible
    assert over_all.feasible
    assert not accepted_only.over_all_messages
    assert accepted_only.expected_accuracy is None
    assert over_all.over_all_messages
    assert over_all.llm_accuracy == 0.95
    assert over_all.threshold < accepted_only.threshold
    assert over_all.llm_share < accepted_only.llm_share
    # the BERT answers kept are below the target on their own; the LLM's make up the rest
    assert over_all.accepted_accuracy is not None
    assert over_all.accepted_accuracy < 0.9
    policy = over_all.policy(spec)
    whole = whole_stream_accuracy(predictions, gold, policy, 0.95)
    assert whole >= 0.9
    assert whole == pytest.approx(over_all.expected_accuracy)
    assert decide(_single("a", over_all.threshold), policy).target is Target.BERT


def test_over_all_scope_with_the_llm_not_above_the_target_keeps_no_more():
    """An LLM right at the target allows what accepted-only does; one below it certifies none."""
    predictions, gold = synthetic_single(np.random.default_rng(1), 1500)
    spec = _spec()
    accepted_only = calibrate_for_accuracy(predictions, gold, spec, 0.9)
    at_target = calibrate_for_accuracy(predictions, gold, spec, 0.9, llm_accuracy=0.9)
    assert at_target.feasible
    assert at_target.llm_share >= accepted_only.llm_share
    assert whole_stream_accuracy(predictions, gold, at_target.policy(spec), 0.9) >= 0.9
    # at 88% the LLM drags the stream down more than the confident answers lift it
    below = calibrate_for_accuracy(predictions, gold, spec, 0.9, llm_accuracy=0.88)
    assert not below.feasible
    assert below.tested
    assert not below.tested[-1].passed
    assert all(test.passed for test in below.tested[:-1])
    assert below.highest_certifiable is None
    assert below.data_needed is None
    assert below.threshold == max(p.top_probability for p in predictions)


# Top-1 probabilities on a grid, so a sweep has few candidates and the population is exact.
_GRID = tuple(round(0.4 + 0.05 * k, 2) for k in range(12))  # 0.40 .. 0.95
_ON_GRID = {(label, c): _single(label, c) for label in LABELS for c in _GRID}


def _grid_draw(rng: np.random.Generator, n: int) -> tuple[list[Prediction], list[str]]:
    """``n`` predictions with top-1 uniform on the grid, each right with that probability."""
    cells = rng.integers(0, len(_GRID), n)
    tops = rng.integers(0, len(LABELS), n)
    right = rng.random(n) < np.array(_GRID)[cells]
    predictions = [_ON_GRID[LABELS[t], _GRID[c]] for c, t in zip(cells, tops, strict=True)]
    gold = [
        LABELS[t] if ok else LABELS[(t + 1) % len(LABELS)]
        for t, ok in zip(tops, right, strict=True)
    ]
    return predictions, gold


def _grid_whole_accuracy(threshold: float, llm_accuracy: float) -> float:
    """Population accuracy of all messages when top-1 probabilities under ``threshold`` go out."""
    return float(np.mean([c if c >= threshold else llm_accuracy for c in _GRID]))


def test_over_all_scope_rarely_certifies_a_threshold_whose_stream_misses_the_target():
    """Over 300 fresh sets, the true whole-stream accuracy is under target at most ~10% (90%).

    The target 88.8% sits just above the population accuracy at threshold 0.70 (88.75%), so a
    draw that certifies 0.70 misses it: the test is near its edge, where the risk is spent.
    """
    rng = np.random.default_rng(7)
    spec = _spec()
    target, llm, confidence, repetitions = 0.888, 0.95, 0.9, 300
    assert _grid_whole_accuracy(0.7, llm) < target < _grid_whole_accuracy(0.75, llm)
    violations = kept = 0
    for _ in range(repetitions):
        predictions, gold = _grid_draw(rng, 600)
        result = calibrate_for_accuracy(
            predictions, gold, spec, target, confidence, llm_accuracy=llm
        )
        assert result.feasible  # the LLM alone reaches the target
        if result.accepted_share == 0.0:
            continue
        kept += 1
        violations += _grid_whole_accuracy(result.threshold, llm) < target
    assert kept >= 0.9 * repetitions
    risk = 1.0 - confidence
    assert violations / repetitions <= risk + 3 * math.sqrt(risk * (1 - risk) / repetitions)


def test_everything_goes_to_the_llm_when_no_threshold_passes_but_the_llm_reaches_the_target():
    """A model always wrong certifies nothing: an LLM at the target takes every message."""
    predictions = [_single("a", 0.9)] * 200
    gold = ["b"] * 200
    spec = _spec()
    for llm in (0.9, 0.97, 1.0):
        result = calibrate_for_accuracy(predictions, gold, spec, 0.9, llm_accuracy=llm)
        assert result.feasible
        assert (result.accepted_share, result.llm_share) == (0.0, 1.0)
        assert result.accepted_accuracy is None
        assert result.expected_accuracy == pytest.approx(llm)
        policy = result.policy(spec)
        assert accepted_by_decide(predictions, gold, policy) == (0.0, None)
        assert decide(_single("a", 0.999), policy).target is Target.LLM
    short = calibrate_for_accuracy(predictions, gold, spec, 0.9, llm_accuracy=0.85)
    assert not short.feasible
    assert short.llm_accuracy == 0.85
    assert [test.passed for test in short.tested] == [False]
    assert short.expected_accuracy is not None
    assert short.expected_accuracy < 0.9


def test_over_all_scope_refuses_per_label_and_an_llm_accuracy_out_of_range():
    """per_label with llm_accuracy, or an LLM accuracy outside (0, 1], is a ValueError."""
    predictions, gold = synthetic_single(np.random.default_rng(4), 100)
    spec = _spec()
    with pytest.raises(ValueError, match="per-label"):
        calibrate_for_accuracy(predictions, gold, spec, 0.8, per_label=True, llm_accuracy=0.9)
    for llm in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError, match="LLM accuracy must lie in"):
            calibrate_for_accuracy(predictions, gold, spec, 0.8, llm_accuracy=llm)
