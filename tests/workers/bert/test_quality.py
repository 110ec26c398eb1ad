import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tiergate.workers.bert.quality import (
    accuracy,
    macro_f1,
    never_predicted,
    per_class_metrics,
)


@st.composite
def single_label_pairs(draw: st.DrawFn) -> tuple[list[int], list[int], int]:
    """Predicted and true class indices of equal length, with the number of labels."""
    n_labels = draw(st.integers(min_value=1, max_value=5))
    n_rows = draw(st.integers(min_value=1, max_value=30))
    indices = st.lists(
        st.integers(min_value=0, max_value=n_labels - 1), min_size=n_rows, max_size=n_rows
    )
    return draw(indices), draw(indices), n_labels


@st.composite
def multi_label_pairs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int]:
    """Predicted and true 0/1 matrices of equal shape, with the number of labels."""
    shape = (draw(st.integers(1, 30)), draw(st.integers(1, 5)))
    flags = hnp.arrays(np.int64, shape, elements=st.integers(0, 1))
    return draw(flags), draw(flags), shape[1]


def test_accuracy_of_single_label_indices():
    """Accuracy is the share of rows whose predicted index equals the true one."""
    assert accuracy([0, 1, 1, 2, 0], [0, 1, 2, 2, 1]) == pytest.approx(0.6)


def test_accuracy_of_multi_label_rows_requires_an_exact_match():
    """A multi-label row counts as right only when every flag matches."""
    predicted = [[1, 0, 1], [0, 1, 0], [1, 1, 0]]
    actual = [[1, 0, 0], [0, 1, 0], [1, 0, 0]]
    assert accuracy(predicted, actual) == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("predicted", "actual"),
    [
        pytest.param([0, 1], [0, 1, 1], id="different-lengths"),
        pytest.param([], [], id="empty"),
        pytest.param([[1, 0]], [[1, 0, 0]], id="different-widths"),
    ],
)
def test_accuracy_rejects_mismatched_or_empty_input(predicted, actual):
    """Predictions and truths of different shapes, or none at all, raise ValueError."""
    with pytest.raises(ValueError, match="same shape"):
        accuracy(predicted, actual)


def test_macro_f1_of_single_label_indices():
    """Macro-F1 averages per-label F1 = 2tp / (2tp + fp + fn) over the labels."""
    # label 0: tp 1, fp 1, fn 0 -> 2/3; label 1: tp 1, fp 1, fn 1 -> 1/2; label 2: tp 1, fn 1 -> 2/3
    assert macro_f1([0, 1, 1, 2, 0], [0, 1, 2, 2, 1], 3) == pytest.approx(11 / 18)


def test_macro_f1_of_multi_label_matrices():
    """Macro-F1 of 0/1 matrices scores each column as its own binary problem."""
    predicted = [[1, 0, 1], [0, 1, 0], [1, 1, 0]]
    actual = [[1, 0, 0], [0, 1, 0], [1, 0, 0]]
    # column 0: perfect -> 1; column 1: tp 1, fp 1 -> 2/3; column 2: only a false positive -> 0
    assert macro_f1(predicted, actual, 3) == pytest.approx(5 / 9)


def test_macro_f1_scores_an_absent_unpredicted_label_as_perfect():
    """A label that is neither present nor predicted contributes F1 = 1 to the mean."""
    assert macro_f1([0, 1], [0, 0], 3) == pytest.approx((2 / 3 + 0.0 + 1.0) / 3)


@given(single_label_pairs())
def test_macro_f1_is_one_for_perfect_single_label_predictions(case):
    """Predicting every true index gives a macro-F1 and an accuracy of exactly 1."""
    _, actual, n_labels = case
    assert macro_f1(actual, actual, n_labels) == 1.0
    assert accuracy(actual, actual) == 1.0


@given(multi_label_pairs())
def test_macro_f1_is_one_for_perfect_multi_label_predictions(case):
    """Predicting every true flag gives a macro-F1 and an accuracy of exactly 1."""
    _, actual, n_labels = case
    assert macro_f1(actual, actual, n_labels) == 1.0
    assert accuracy(actual, actual) == 1.0


@given(st.one_of(single_label_pairs(), multi_label_pairs()))
def test_macro_f1_and_accuracy_lie_between_zero_and_one(case):
    """For any predictions and truths, macro-F1 and accuracy lie in [0, 1]."""
    predicted, actual, n_labels = case
    assert 0.0 <= macro_f1(predicted, actual, n_labels) <= 1.0
    assert 0.0 <= accuracy(predicted, actual) <= 1.0


@given(st.one_of(single_label_pairs(), multi_label_pairs()))
def test_macro_f1_is_the_mean_of_the_per_class_f1(case):
    """The card's macro-F1 and its per-label F1 values agree: one is the mean of the other."""
    predicted, actual, n_labels = case
    labels = [f"label-{k}" for k in range(n_labels)]
    per_class = per_class_metrics(predicted, actual, labels)
    mean = np.mean([metrics.f1 for metrics in per_class.values()])
    assert macro_f1(predicted, actual, n_labels) == pytest.approx(mean)


def test_never_predicted_names_present_labels_the_model_never_chose():
    """A label with validation examples but no prediction is named; an absent one is not."""
    per_class = per_class_metrics([0, 0, 1, 0], [0, 2, 1, 2], ["common", "other", "rare", "gone"])
    assert never_predicted(per_class) == ["rare"]
