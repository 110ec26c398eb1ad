"""Classification quality measures over label indices (pure numpy).

Per-label figures come from :mod:`tiergate.policies.class_metrics` (cascade evaluation reports
them too) and are offered here beside the training card's other measures.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from tiergate.policies.class_metrics import ClassMetrics, per_class_metrics

__all__ = ["ClassMetrics", "accuracy", "macro_f1", "never_predicted", "per_class_metrics"]


def accuracy(predicted: npt.ArrayLike, actual: npt.ArrayLike) -> float:
    """Share of rows where the prediction equals the truth (exact match for multi-label rows)."""
    p, y = np.asarray(predicted), np.asarray(actual)
    if p.shape != y.shape or len(p) == 0:
        raise ValueError("predictions and truths must be non-empty and of the same shape")
    matches = p == y if p.ndim == 1 else (p == y).all(axis=1)
    return float(matches.mean())


def macro_f1(predicted: npt.ArrayLike, actual: npt.ArrayLike, n_labels: int) -> float:
    """Unweighted mean of per-label F1.

    Single-label input is a vector of class indices; multi-label input is an ``(n, k)`` 0/1
    matrix. A label that is neither predicted nor present scores F1 = 1 (nothing to get wrong).
    """
    p, y = np.asarray(predicted), np.asarray(actual)
    if p.shape != y.shape or len(p) == 0:
        raise ValueError("predictions and truths must be non-empty and of the same shape")
    if p.ndim == 1:
        if p.min() < 0 or y.min() < 0 or max(p.max(), y.max()) >= n_labels:
            raise ValueError(f"class indices must lie in [0, {n_labels})")
        p = np.eye(n_labels, dtype=bool)[p]
        y = np.eye(n_labels, dtype=bool)[y]
    p, y = p.astype(bool), y.astype(bool)
    scores = []
    for k in range(n_labels):
        tp = float((p[:, k] & y[:, k]).sum())
        fp = float((p[:, k] & ~y[:, k]).sum())
        fn = float((~p[:, k] & y[:, k]).sum())
        scores.append(1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def never_predicted(per_class: Mapping[str, ClassMetrics]) -> list[str]:
    """The labels that occur (support above 0) but that the model never predicted, in order."""
    return [label for label, m in per_class.items() if m.support > 0 and m.predicted == 0]
