"""Quality per label: precision, recall, F1, and how often each label is true and predicted.

Pure numpy over class indices (single-label) or 0/1 matrices (multi-label), so that both the
training card (:mod:`tiergate.workers.bert.train`) and cascade evaluation
(:mod:`tiergate.policies.evaluate`) report a rare label's fate the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict


class ClassMetrics(BaseModel):
    """How one label fares on a labelled set.

    ``support`` counts the examples that truly carry the label and ``predicted`` those the
    model gave it. ``precision`` is ``None`` when the label was never predicted and ``recall``
    when it never occurs (the ratio has no denominator). ``f1`` is ``2tp / (2tp + fp + fn)``,
    and 1 for a label neither present nor predicted (nothing to get wrong), so the mean of the
    ``f1`` values is the macro-F1.
    """

    model_config = ConfigDict(frozen=True)

    precision: float | None
    recall: float | None
    f1: float
    support: int
    predicted: int


def per_class_metrics(
    predicted: npt.ArrayLike, actual: npt.ArrayLike, labels: Sequence[str]
) -> dict[str, ClassMetrics]:
    """Precision, recall, F1, support and predicted count of each of ``labels``, in label order.

    Single-label input is a vector of class indices into ``labels``; multi-label input is an
    ``(n, len(labels))`` 0/1 matrix (a row of zeros predicts no label, as a missing answer does).

    Raises:
        ValueError: the inputs are empty, differ in shape, or do not fit ``labels``.
    """
    p, y = np.asarray(predicted), np.asarray(actual)
    k = len(labels)
    if p.shape != y.shape or len(p) == 0:
        raise ValueError("predictions and truths must be non-empty and of the same shape")
    if p.ndim == 1:
        if p.min() < 0 or y.min() < 0 or max(p.max(), y.max()) >= k:
            raise ValueError(f"class indices must lie in [0, {k})")
        p, y = _one_hot(p, k), _one_hot(y, k)
    elif p.ndim != 2 or p.shape[1] != k:
        raise ValueError(f"a multi-label matrix needs one column per label ({k})")
    flagged, true = p.astype(bool), y.astype(bool)
    tp = (flagged & true).sum(axis=0)
    support = true.sum(axis=0)
    count = flagged.sum(axis=0)
    result = {}
    for j, label in enumerate(labels):
        hits, n_true, n_predicted = int(tp[j]), int(support[j]), int(count[j])
        wrong = n_true + n_predicted - 2 * hits  # false positives plus false negatives
        result[label] = ClassMetrics(
            precision=hits / n_predicted if n_predicted else None,
            recall=hits / n_true if n_true else None,
            f1=1.0 if hits + wrong == 0 else 2 * hits / (2 * hits + wrong),
            support=n_true,
            predicted=n_predicted,
        )
    return result


def _one_hot(indices: npt.NDArray[np.generic], k: int) -> npt.NDArray[np.bool_]:
    matrix: npt.NDArray[np.bool_] = np.eye(k, dtype=bool)[indices]
    return matrix
