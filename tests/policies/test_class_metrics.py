import numpy as np
import pytest

from tiergate.policies.class_metrics import ClassMetrics, per_class_metrics


def test_per_class_metrics_of_single_label_indices():
    """Each label's precision, recall, F1, support and predicted count, counted by hand."""
    predicted = [0, 0, 0, 1, 1, 0]
    actual = [0, 0, 1, 1, 2, 2]
    metrics = per_class_metrics(predicted, actual, ["a", "b", "c"])
    # a: predicted 4 times, 2 right, 2 true -> P 1/2, R 1, F1 2*2/(4+2+0) = 2/3
    assert metrics["a"] == ClassMetrics(precision=0.5, recall=1.0, f1=4 / 6, support=2, predicted=4)
    # b: predicted twice, 1 right, 2 true -> P 1/2, R 1/2, F1 1/2
    assert metrics["b"] == ClassMetrics(precision=0.5, recall=0.5, f1=0.5, support=2, predicted=2)
    # c: two true, never predicted -> no precision, recall 0, F1 0
    assert metrics["c"] == ClassMetrics(precision=None, recall=0.0, f1=0.0, support=2, predicted=0)
    assert list(metrics) == ["a", "b", "c"]


def test_per_class_metrics_of_multi_label_matrices():
    """Each column of a 0/1 matrix is its own binary problem; an absent label has no recall."""
    predicted = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    actual = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [1, 0, 0]])
    metrics = per_class_metrics(predicted, actual, ["spam", "abuse", "ads"])
    # spam: tp 2, fn 1 -> P 1, R 2/3, F1 4/5
    assert metrics["spam"].precision == 1.0
    assert metrics["spam"].recall == pytest.approx(2 / 3)
    assert metrics["spam"].f1 == pytest.approx(0.8)
    assert (metrics["spam"].support, metrics["spam"].predicted) == (3, 2)
    # abuse: tp 1, fp 1 -> P 1/2, R 1, F1 2/3
    assert metrics["abuse"].precision == 0.5
    assert metrics["abuse"].recall == 1.0
    assert metrics["abuse"].f1 == pytest.approx(2 / 3)
    # ads: never true, predicted once -> P 0, no recall, F1 0
    assert metrics["ads"] == ClassMetrics(
        precision=0.0, recall=None, f1=0.0, support=0, predicted=1
    )


def test_a_label_neither_present_nor_predicted_scores_f1_one():
    """A label with no true and no predicted example has neither ratio and F1 = 1."""
    metrics = per_class_metrics([0, 1], [0, 1], ["a", "b", "c"])
    assert metrics["c"] == ClassMetrics(precision=None, recall=None, f1=1.0, support=0, predicted=0)


@pytest.mark.parametrize(
    ("predicted", "actual", "message"),
    [
        pytest.param([0, 1], [0, 1, 1], "same shape", id="different-lengths"),
        pytest.param([], [], "same shape", id="empty"),
        pytest.param([0, 3], [0, 1], r"\[0, 3\)", id="index-out-of-range"),
        pytest.param([[1, 0]], [[1, 0]], "one column per label", id="too-few-columns"),
    ],
)
def test_per_class_metrics_rejects_input_that_does_not_fit(predicted, actual, message):
    """Mismatched, empty or out-of-range input raises ValueError naming the problem."""
    with pytest.raises(ValueError, match=message):
        per_class_metrics(predicted, actual, ["a", "b", "c"])
