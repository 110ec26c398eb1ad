"""Turning logits into calibrated probabilities, and measuring calibration.

Pure numpy. Temperature scaling (Guo et al., 2017) divides every logit by one scalar ``T``
chosen to minimise the negative log-likelihood on held-out data: it leaves the ranking (and so
accuracy) unchanged and fixes over- or under-confidence.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def softmax(logits: npt.ArrayLike, temperature: float = 1.0) -> FloatArray:
    """Row-wise softmax of ``logits / temperature``, computed stably."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    result: FloatArray = e / e.sum(axis=-1, keepdims=True)
    return result


def sigmoid(logits: npt.ArrayLike, temperature: float = 1.0) -> FloatArray:
    """Element-wise logistic of ``logits / temperature``, without overflow."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    result: FloatArray = np.exp(-np.logaddexp(0.0, -z))
    return result


def _nll(logits: FloatArray, targets: npt.NDArray[np.int64], temperature: float) -> float:
    """Mean negative log-likelihood of single-label targets at one temperature."""
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(targets)), targets].mean())


def _bce(logits: FloatArray, targets: FloatArray, temperature: float) -> float:
    """Mean binary cross-entropy of multi-label targets at one temperature."""
    z = logits / temperature
    # log(sigmoid(z)) = -logaddexp(0, -z); log(1 - sigmoid(z)) = -logaddexp(0, z)
    loss = targets * np.logaddexp(0.0, -z) + (1.0 - targets) * np.logaddexp(0.0, z)
    return float(loss.mean())


def _served_nll(
    logits: FloatArray,
    targets: npt.NDArray[np.int64],
    counts: npt.NDArray[np.int64],
    temperature: float,
) -> float:
    """Mean NLL of single-label texts served as the mean softmax of their contiguous windows."""
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    served = np.add.reduceat(softmax(logits, temperature), starts, axis=0) / counts[:, None]
    return float(-np.log(np.clip(served[np.arange(len(targets)), targets], 1e-300, None)).mean())


def calibrate_temperature(
    logits: npt.ArrayLike,
    targets: npt.ArrayLike,
    *,
    multi_label: bool = False,
    bounds: tuple[float, float] = (0.05, 20.0),
    counts: Sequence[int] | None = None,
) -> float:
    """The temperature that minimises held-out NLL (softmax) or BCE (sigmoid).

    Args:
        logits: ``(n, k)`` raw scores from the model.
        targets: ``(n,)`` class indices for single-label, ``(n, k)`` 0/1 for multi-label.
        multi_label: whether the head is sigmoid (multi-label) rather than softmax.
        bounds: the search interval for ``T``.
        counts: when given, ``logits`` hold the windows of ``len(counts)`` texts (text ``i``
            owns the next ``counts[i]`` rows) and ``targets`` one row per text; the loss is
            then that of each text's probabilities as the BERT tier serves them: the mean of
            its windows' softmax, or per label the maximum of their sigmoids.

    Returns:
        The fitted temperature, found by golden-section search on ``log T`` (the loss is
        unimodal in ``T`` for a fixed set of logits with one row per text; for the mean of
        several windows' softmax the search finds a local minimum).
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or len(z) == 0:
        raise ValueError("logits must be a non-empty (n, k) array")
    sizes = None
    if counts is not None:
        sizes = np.asarray(counts, dtype=np.int64)
        if sizes.ndim != 1 or len(sizes) == 0 or sizes.min() < 1 or sizes.sum() != len(z):
            raise ValueError("counts must be positive window counts that sum to the rows of logits")
        if multi_label:
            # the maximum of sigmoids is the sigmoid of the maximum logit, at every temperature
            starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
            z, sizes = np.maximum.reduceat(z, starts, axis=0), None
    if multi_label:
        y_multi = np.asarray(targets, dtype=np.float64)
        if y_multi.shape != z.shape:
            raise ValueError("multi-label targets must have the shape of the logits")

        def loss(t: float) -> float:
            return _bce(z, y_multi, t)
    else:
        y = np.asarray(targets, dtype=np.int64)
        if y.shape != (len(z) if sizes is None else len(sizes),):
            raise ValueError("single-label targets must be one class index per row (or text)")
        if y.min() < 0 or y.max() >= z.shape[1]:
            raise ValueError(f"class indices must lie in [0, {z.shape[1]})")

        def loss(t: float) -> float:
            return _nll(z, y, t) if sizes is None else _served_nll(z, y, sizes, t)

    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    a, b = lo + (1 - ratio) * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(float(np.exp(a))), loss(float(np.exp(b)))
    for _ in range(80):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = lo + (1 - ratio) * (hi - lo)
            fa = loss(float(np.exp(a)))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(float(np.exp(b)))
    return float(np.exp((lo + hi) / 2.0))


def _binned_gap(confidence: FloatArray, outcome: FloatArray, bins: int) -> float:
    """Weighted mean over equal-width confidence bins of ``|mean outcome - mean confidence|``."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    # bin i holds confidences in (edges[i], edges[i+1]]; a confidence of exactly 0 joins bin 0
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    gap = 0.0
    for i in range(bins):
        in_bin = index == i
        if in_bin.any():
            gap += in_bin.mean() * abs(outcome[in_bin].mean() - confidence[in_bin].mean())
    return float(gap)


def expected_calibration_error(
    probabilities: npt.ArrayLike, targets: npt.ArrayLike, *, bins: int = 15
) -> float:
    """Expected calibration error of single-label predictions (equal-width confidence bins).

    The weighted mean, over bins of top-1 confidence, of ``|accuracy - mean confidence|``.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(targets, dtype=np.int64)
    if len(p) == 0:
        raise ValueError("no predictions to measure")
    return _binned_gap(p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64), bins)


def multilabel_calibration_error(
    probabilities: npt.ArrayLike, targets: npt.ArrayLike, *, bins: int = 15
) -> float:
    """Expected calibration error of independent per-label probabilities (all cells pooled)."""
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    y = np.asarray(targets, dtype=np.float64).ravel()
    if len(p) == 0:
        raise ValueError("no predictions to measure")
    return _binned_gap(p, y, bins)


def log_loss(
    probabilities: npt.ArrayLike, targets: npt.ArrayLike, *, multi_label: bool = False
) -> float:
    """Mean negative log-likelihood of served probabilities (the quantity temperature fits).

    Single-label: ``targets`` are class indices. Multi-label: a 0/1 matrix, scored as mean
    binary cross-entropy. Probabilities are clipped to ``[1e-12, 1 - 1e-12]``.
    """
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0 - 1e-12)
    if multi_label:
        y = np.asarray(targets, dtype=np.float64)
        return float(-(y * np.log(p) + (1.0 - y) * np.log(1.0 - p)).mean())
    index = np.asarray(targets, dtype=np.int64)
    return float(-np.log(p[np.arange(len(index)), index]).mean())
