import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tiergate.workers.bert.temperature import (
    calibrate_temperature,
    expected_calibration_error,
    multilabel_calibration_error,
    sigmoid,
    softmax,
)

# Bounded so that adding a shift of the same size stays exact enough to compare.
moderate_floats = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False)
logit_matrices = hnp.arrays(
    np.float64,
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=8),
    elements=moderate_floats,
)


def sample_single_labels(
    rng: np.random.Generator, logits: np.ndarray, temperature: float
) -> np.ndarray:
    """One class index per row, drawn from ``softmax(logits / temperature)``."""
    cumulative = softmax(logits, temperature).cumsum(axis=1)
    draws = rng.random((len(logits), 1))
    labels: np.ndarray = np.minimum((cumulative < draws).sum(axis=1), logits.shape[1] - 1)
    return labels


def mean_nll(logits: np.ndarray, targets: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of the targets under the tempered softmax."""
    probabilities = softmax(logits, temperature)
    return float(-np.log(probabilities[np.arange(len(targets)), targets]).mean())


@given(logit_matrices)
def test_softmax_rows_are_probability_distributions(logits):
    """Every softmax row is non-negative and sums to 1."""
    probabilities = softmax(logits)
    assert probabilities.shape == logits.shape
    assert (probabilities >= 0.0).all()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-12)


@given(logit_matrices, st.data())
def test_softmax_is_invariant_to_a_constant_added_per_row(logits, data):
    """Adding any constant to a row of logits leaves that row's softmax unchanged."""
    shifts = data.draw(hnp.arrays(np.float64, (len(logits), 1), elements=moderate_floats))
    np.testing.assert_allclose(softmax(logits + shifts), softmax(logits), rtol=1e-9, atol=1e-12)


def test_softmax_of_huge_logits_does_not_overflow():
    """Logits far beyond exp's range give a finite one-hot row, not NaN or an overflow."""
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        probabilities = softmax([[1e300, 0.0, -1e300], [-1e4, 1e4, 0.0]])
    np.testing.assert_array_equal(probabilities, [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def test_softmax_temperature_divides_the_logits():
    """softmax(z, T) equals softmax(z / T)."""
    logits = np.array([[2.0, -1.0, 0.5]])
    np.testing.assert_allclose(softmax(logits, 2.5), softmax(logits / 2.5))


def test_sigmoid_of_huge_logits_does_not_overflow():
    """Huge positive and negative logits map to exactly 1 and 0 without a floating-point error."""
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        probabilities = sigmoid([1e308, -1e308, 1e4, -1e4, 0.0])
    np.testing.assert_array_equal(probabilities, [1.0, 0.0, 1.0, 0.0, 0.5])


@given(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False))
def test_sigmoid_is_symmetric_about_one_half(logit):
    """sigmoid(x) + sigmoid(-x) equals 1 and each lies in [0, 1]."""
    positive, negative = sigmoid(logit), sigmoid(-logit)
    assert 0.0 <= positive <= 1.0
    assert positive + negative == pytest.approx(1.0, abs=1e-12)


def test_sigmoid_temperature_divides_the_logits():
    """sigmoid(z, T) equals sigmoid(z / T)."""
    np.testing.assert_allclose(sigmoid([3.0, -2.0], 2.0), sigmoid([1.5, -1.0]))


@pytest.mark.parametrize("t_true", [0.5, 2.5])
def test_calibrate_temperature_recovers_the_temperature_of_single_label_data(t_true):
    """Labels drawn from softmax(logits / T) give back a fitted temperature close to T."""
    rng = np.random.default_rng(20240611)
    logits = rng.normal(scale=3.0, size=(20_000, 4))
    targets = sample_single_labels(rng, logits, t_true)

    fitted = calibrate_temperature(logits, targets)

    assert fitted == pytest.approx(t_true, rel=0.1)


@pytest.mark.parametrize("t_true", [0.5, 2.5])
def test_calibrate_temperature_recovers_the_temperature_of_multi_label_data(t_true):
    """Flags drawn from sigmoid(logits / T) give back a fitted temperature close to T."""
    rng = np.random.default_rng(7)
    logits = rng.normal(scale=3.0, size=(10_000, 3))
    targets = (rng.random(logits.shape) < sigmoid(logits, t_true)).astype(np.float64)

    fitted = calibrate_temperature(logits, targets, multi_label=True)

    assert fitted == pytest.approx(t_true, rel=0.1)


def test_fitted_temperature_lowers_the_nll_of_overconfident_logits():
    """For logits three times too sharp, the fitted T exceeds 1 and beats T = 1 on NLL."""
    rng = np.random.default_rng(11)
    honest = rng.normal(scale=1.5, size=(5_000, 5))
    targets = sample_single_labels(rng, honest, 1.0)
    overconfident = 3.0 * honest

    fitted = calibrate_temperature(overconfident, targets)

    assert fitted > 1.5
    assert mean_nll(overconfident, targets, fitted) < mean_nll(overconfident, targets, 1.0)


def test_calibrate_temperature_stays_within_its_bounds():
    """When the loss keeps falling past the upper bound, the fit stops at that bound."""
    logits = np.array([[4.0, 0.0], [0.0, 4.0]] * 10)
    always_wrong = np.array([1, 0] * 10)

    fitted = calibrate_temperature(logits, always_wrong, bounds=(0.1, 5.0))

    assert 4.9 <= fitted <= 5.0


@pytest.mark.parametrize(
    ("logits", "targets", "multi_label"),
    [
        pytest.param([1.0, 2.0], [0], False, id="one-dimensional-logits"),
        pytest.param(np.empty((0, 3)), [], False, id="no-rows"),
        pytest.param([[1.0, 2.0], [0.0, 1.0]], [0], False, id="too-few-targets"),
        pytest.param([[1.0, 2.0], [0.0, 1.0]], [[0, 1], [1, 0]], False, id="matrix-targets"),
        pytest.param([[1.0, 2.0], [0.0, 1.0]], [0, 1], True, id="multi-label-index-targets"),
        pytest.param([[1.0, 2.0], [0.0, 1.0]], [[0, 1, 0], [1, 0, 0]], True, id="wrong-width"),
    ],
)
def test_calibrate_temperature_rejects_bad_shapes(logits, targets, multi_label):
    """Logits that are not a non-empty matrix, or targets of the wrong shape, raise ValueError."""
    with pytest.raises(ValueError, match="must"):
        calibrate_temperature(logits, targets, multi_label=multi_label)


def test_ece_is_near_zero_for_calibrated_predictions():
    """When each prediction is right with probability equal to its confidence, ECE is near 0."""
    rng = np.random.default_rng(3)
    confidence = rng.uniform(0.5, 1.0, size=200_000)
    probabilities = np.column_stack([confidence, 1.0 - confidence])
    targets = np.where(rng.random(confidence.shape) < confidence, 0, 1)

    assert expected_calibration_error(probabilities, targets) < 0.01


def test_ece_is_large_for_confident_wrong_predictions():
    """Predictions at 99% confidence that are always wrong have an ECE of 0.99."""
    probabilities = np.tile([0.99, 0.01], (50, 1))
    targets = np.ones(50, dtype=np.int64)

    assert expected_calibration_error(probabilities, targets) == pytest.approx(0.99)


def test_ece_matches_a_hand_computed_example():
    """ECE weighs |accuracy - mean confidence| of each bin by the bin's share of rows."""
    probabilities = [
        [0.9, 0.1, 0.0],  # bin (0.5, 1], right
        [0.8, 0.2, 0.0],  # bin (0.5, 1], wrong
        [0.4, 0.3, 0.3],  # bin (0, 0.5], right
        [0.45, 0.35, 0.2],  # bin (0, 0.5], wrong
    ]
    targets = [0, 1, 0, 2]
    # upper bin: 0.5 * |0.5 - 0.85| = 0.175; lower bin: 0.5 * |0.5 - 0.425| = 0.0375
    assert expected_calibration_error(probabilities, targets, bins=2) == pytest.approx(0.2125)


def test_ece_rejects_empty_input():
    """Measuring calibration of no predictions raises ValueError."""
    with pytest.raises(ValueError, match="no predictions"):
        expected_calibration_error(np.empty((0, 2)), [])


def test_multilabel_calibration_error_matches_a_hand_computed_example():
    """Pooled per-label ECE compares each bin's positive rate with its mean probability."""
    probabilities = [[0.9, 0.2], [0.7, 0.1]]
    targets = [[1, 0], [0, 1]]
    # upper bin {0.9, 0.7}: 0.5 * |0.5 - 0.8| = 0.15; lower bin {0.2, 0.1}: 0.5 * |0.5 - 0.15|
    assert multilabel_calibration_error(probabilities, targets, bins=2) == pytest.approx(0.325)


def test_multilabel_calibration_error_is_near_zero_for_calibrated_flags():
    """Flags that are set with exactly their predicted probability give a pooled ECE near 0."""
    rng = np.random.default_rng(5)
    probabilities = rng.random((50_000, 4))
    targets = (rng.random(probabilities.shape) < probabilities).astype(np.float64)

    assert multilabel_calibration_error(probabilities, targets) < 0.01


def served_nll(logits: np.ndarray, targets: np.ndarray, counts: list[int], t: float) -> float:
    """Mean NLL of texts served as the mean softmax of their consecutive windows."""
    starts = np.cumsum([0, *counts[:-1]])
    probs = softmax(logits, t)
    served = np.array([probs[s : s + c].mean(axis=0) for s, c in zip(starts, counts, strict=True)])
    return float(-np.log(served[np.arange(len(targets)), targets]).mean())


def test_calibrate_temperature_fits_the_served_mean_of_windows():
    """With window counts, the fit minimises the NLL of each text's mean window softmax."""
    rng = np.random.default_rng(5)
    counts = [int(c) for c in rng.integers(1, 5, size=400)]
    logits = rng.normal(scale=3.0, size=(sum(counts), 3))
    targets = rng.integers(0, 3, size=len(counts))
    targets[::2] = [int(row.argmax()) for row in logits[np.cumsum([0, *counts[:-1]])][::2]]

    fitted = calibrate_temperature(logits, targets, counts=counts)

    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 2001))
    best = grid[np.argmin([served_nll(logits, targets, counts, t) for t in grid])]
    assert fitted == pytest.approx(best, rel=0.01)
    plain = calibrate_temperature(logits, np.repeat(targets, counts))
    assert served_nll(logits, targets, counts, fitted) < served_nll(logits, targets, counts, plain)


def test_calibrate_temperature_with_one_window_per_text_is_the_plain_fit():
    """Counts of one window each give the temperature fitted without counts."""
    rng = np.random.default_rng(9)
    logits = rng.normal(scale=2.0, size=(500, 4))
    targets = sample_single_labels(rng, logits, 1.7)
    plain = calibrate_temperature(logits, targets)
    assert calibrate_temperature(logits, targets, counts=[1] * 500) == pytest.approx(plain)


def test_multi_label_served_fit_uses_each_labels_highest_window():
    """Multi-label with counts fits the per-label maximum logit of each text's windows."""
    rng = np.random.default_rng(4)
    counts = [int(c) for c in rng.integers(1, 4, size=300)]
    logits = rng.normal(scale=2.0, size=(sum(counts), 3))
    starts = np.cumsum([0, *counts[:-1]])
    highest = np.maximum.reduceat(logits, starts, axis=0)
    targets = (rng.random(highest.shape) < sigmoid(highest, 0.6)).astype(np.float64)
    served = calibrate_temperature(logits, targets, multi_label=True, counts=counts)
    assert served == pytest.approx(calibrate_temperature(highest, targets, multi_label=True))


@pytest.mark.parametrize(
    "counts",
    [
        pytest.param([1, 1], id="too-few-windows"),
        pytest.param([2, 2], id="too-many-windows"),
        pytest.param([3, 0], id="an-empty-text"),
    ],
)
def test_calibrate_temperature_rejects_counts_that_do_not_cover_the_logits(counts):
    """Window counts that do not sum to the logits' rows, or a text of no window, raise."""
    with pytest.raises(ValueError, match="counts must"):
        calibrate_temperature(np.zeros((3, 2)), [0, 1], counts=counts)
