"""Classification metrics, implemented in numpy (scikit-learn is only the tests' reference).

Every metric takes integer labels ``y_true`` of shape ``(N,)`` and class probabilities
``probs`` of shape ``(N, K)`` with ``K >= 2``. Binary problems (``K == 2``) score class 1;
multi-class problems average one-vs-rest scores over classes (macro).

Ranking metrics (``auroc``, ``average_precision``, ``pr_auc_trapezoid``) follow
scikit-learn's definitions:

* ``auroc``: rank-based ROC AUC (Mann-Whitney U with average ranks for ties), equal to
  ``roc_auc_score(y, p[:, 1])`` for binary and ``roc_auc_score(y, p, multi_class="ovr")``
  for multi-class. Classes absent from ``y_true`` are skipped in the macro mean (their
  one-vs-rest AUC is undefined); fewer than two classes present gives ``nan``.
* ``average_precision``: step-wise AP ``sum_n (R_n - R_{n-1}) P_n`` as
  ``average_precision_score``; ``nan`` in the binary case when there is no positive.
  The multi-class macro mean runs over classes present in ``y_true``.
* ``pr_auc_trapezoid``: the PR-AUC of the TruncatedTL paper,
  ``auc(recall, precision)`` over ``precision_recall_curve``'s points (trapezoidal rule,
  final point ``(recall=0, precision=1)`` included). Same class handling as AP.

Threshold metrics (``accuracy``, ``balanced_accuracy``, ``f1_macro``) use argmax
predictions. Shape or value errors in the inputs are programming errors: ``ValueError``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ttl_search.errors import ConfigError, choices

MAXIMIZE = "maximize"
MINIMIZE = "minimize"

#: Every metric name :func:`compute_metrics` can return, with its optimisation direction.
METRICS: dict[str, str] = {
    "auroc": MAXIMIZE,
    "auprc": MAXIMIZE,
    "pr_auc_trapz": MAXIMIZE,
    "accuracy": MAXIMIZE,
    "balanced_accuracy": MAXIMIZE,
    "f1_macro": MAXIMIZE,
    "loss": MINIMIZE,
}


def metric_direction(name: str) -> str:
    """Return ``"maximize"`` or ``"minimize"`` for a metric name.

    Raises :class:`~ttl_search.errors.ConfigError` listing the valid names when unknown.
    """
    try:
        return METRICS[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown metric {name!r}; valid metrics: {choices(METRICS)}"
        ) from None


# --------------------------------------------------------------------------- validation


def _check_inputs(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(labels as int64 (N,), probs as float64 (N, K))`` or raise ``ValueError``."""
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"y_true must have shape (N,), got {y.shape}")
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probs must have shape (N, K) with K >= 2, got {p.shape}")
    if p.shape[0] != y.shape[0]:
        raise ValueError(f"y_true has {y.shape[0]} samples but probs has {p.shape[0]}")
    if y.shape[0] == 0:
        raise ValueError("metrics need at least one sample")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contains NaN or infinite values")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ValueError("y_true must hold integer class labels")
    elif y.dtype.kind not in "iub":
        raise ValueError(f"y_true must hold integer class labels, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(
            f"y_true labels must lie in [0, {p.shape[1] - 1}], got {y.min()}..{y.max()}"
        )
    return y, p


# --------------------------------------------------------------------- binary primitives


def _binary_auroc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of ``score`` for boolean ``positive`` (Mann-Whitney, average ranks)."""
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # 1-based rank of the last element in each tie group
    average_rank = ends - (counts - 1) / 2.0
    rank_sum = float(average_rank[inverse.ravel()][positive].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def _precision_recall_curve(
    positive: np.ndarray, score: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's ``precision_recall_curve`` (without thresholds); needs a positive.

    One point per distinct score in decreasing recall order, then ``(R=0, P=1)``.
    """
    order = np.argsort(score, kind="mergesort")[::-1]
    sorted_score = score[order]
    sorted_pos = positive[order].astype(np.float64)
    distinct = np.flatnonzero(np.diff(sorted_score))
    threshold_idx = np.r_[distinct, sorted_score.size - 1]
    tps = np.cumsum(sorted_pos)[threshold_idx]
    fps = 1.0 + threshold_idx - tps
    precision = tps / (tps + fps)  # tps + fps >= 1 at every threshold
    recall = tps / tps[-1]
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0]


def _binary_average_precision(positive: np.ndarray, score: np.ndarray) -> float:
    """Step-wise AP ``sum (R_n - R_{n-1}) P_n``; ``nan`` without positives."""
    if not positive.any():
        return float("nan")
    precision, recall = _precision_recall_curve(positive, score)
    return max(0.0, float(-np.sum(np.diff(recall) * precision[:-1])))


def _binary_pr_auc_trapezoid(positive: np.ndarray, score: np.ndarray) -> float:
    """Trapezoidal area under the PR curve (``auc(recall, precision)``); ``nan`` without positives."""
    if not positive.any():
        return float("nan")
    precision, recall = _precision_recall_curve(positive, score)
    # recall is non-increasing, so the signed trapezoid area is negated (sklearn's auc).
    return float(-np.sum(np.diff(recall) * (precision[1:] + precision[:-1]) / 2.0))


# -------------------------------------------------------------------- ranking metrics


def _macro(
    binary_metric: Callable[[np.ndarray, np.ndarray], float],
    y: np.ndarray,
    p: np.ndarray,
    classes: np.ndarray,
) -> float:
    """Macro mean of ``binary_metric`` one-vs-rest over ``classes``; ``nan`` when empty."""
    if classes.size == 0:
        return float("nan")
    return float(np.mean([binary_metric(y == k, p[:, k]) for k in classes]))


def auroc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC: class 1 for binary, macro one-vs-rest over present classes otherwise.

    ``nan`` when fewer than two classes occur in ``y_true``.
    """
    y, p = _check_inputs(y_true, probs)
    present = np.unique(y)
    if present.size < 2:
        return float("nan")
    if p.shape[1] == 2:
        return _binary_auroc(y == 1, p[:, 1])
    return _macro(_binary_auroc, y, p, present)


def average_precision(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Average precision (sklearn's step-wise definition); macro OvR for multi-class.

    Binary: ``nan`` when class 1 never occurs. Multi-class: mean over present classes.
    """
    y, p = _check_inputs(y_true, probs)
    if p.shape[1] == 2:
        return _binary_average_precision(y == 1, p[:, 1])
    return _macro(_binary_average_precision, y, p, np.unique(y))


def pr_auc_trapezoid(y_true: np.ndarray, probs: np.ndarray) -> float:
    """PR-AUC by the trapezoidal rule over sklearn's PR curve (the TruncatedTL paper's).

    Binary on class 1 (``nan`` without positives); macro OvR over present classes otherwise.
    """
    y, p = _check_inputs(y_true, probs)
    if p.shape[1] == 2:
        return _binary_pr_auc_trapezoid(y == 1, p[:, 1])
    return _macro(_binary_pr_auc_trapezoid, y, p, np.unique(y))


# ------------------------------------------------------------------ threshold metrics


def accuracy(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Fraction of samples whose argmax prediction equals the label."""
    y, p = _check_inputs(y_true, probs)
    return float(np.mean(p.argmax(axis=1) == y))


def balanced_accuracy(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``y_true`` (as sklearn)."""
    y, p = _check_inputs(y_true, probs)
    pred = p.argmax(axis=1)
    recalls = [np.mean(pred[y == k] == k) for k in np.unique(y)]
    return float(np.mean(recalls))


def f1_macro(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Macro F1 over labels in ``y_true`` or the predictions (sklearn, zero_division=0)."""
    y, p = _check_inputs(y_true, probs)
    pred = p.argmax(axis=1)
    scores = []
    for k in np.union1d(y, pred):
        tp = float(np.sum((pred == k) & (y == k)))
        fp = float(np.sum((pred == k) & (y != k)))
        fn = float(np.sum((pred != k) & (y == k)))
        denominator = 2.0 * tp + fp + fn
        scores.append(2.0 * tp / denominator if denominator > 0 else 0.0)
    return float(np.mean(scores))


# ------------------------------------------------------------------------------ bundle


def compute_metrics(
    y_true: np.ndarray, probs: np.ndarray, loss: float | None = None
) -> dict[str, float]:
    """All metrics of :data:`METRICS` as plain floats; ``"loss"`` only when given."""
    _check_inputs(y_true, probs)
    result: dict[str, float] = {
        "auroc": auroc(y_true, probs),
        "auprc": average_precision(y_true, probs),
        "pr_auc_trapz": pr_auc_trapezoid(y_true, probs),
        "accuracy": accuracy(y_true, probs),
        "balanced_accuracy": balanced_accuracy(y_true, probs),
        "f1_macro": f1_macro(y_true, probs),
    }
    if loss is not None:
        result["loss"] = float(loss)
    return result


LOSS_CLIP = 1e-12
"""Probabilities are clipped from below at this value before the log of the loss."""


def _nll(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class, probabilities clipped at 1e-12."""
    y, p = _check_inputs(y_true, probs)
    return float(np.mean(-np.log(np.clip(p[np.arange(y.size), y], LOSS_CLIP, None))))


_METRIC_FUNCTIONS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "auroc": auroc,
    "auprc": average_precision,
    "pr_auc_trapz": pr_auc_trapezoid,
    "accuracy": accuracy,
    "balanced_accuracy": balanced_accuracy,
    "f1_macro": f1_macro,
    "loss": _nll,
}


def metric_value(metric: str, labels: np.ndarray, probs: np.ndarray) -> float:
    """One metric of :data:`~ttl_search.train.metrics.METRICS` from predictions.

    ``"loss"`` is the mean negative log-likelihood of the true class (probabilities clipped at
    :data:`LOSS_CLIP`). Unknown names raise :class:`ConfigError`; bad shapes raise ``ValueError``.
    """
    metric_direction(metric)
    return float(_METRIC_FUNCTIONS[metric](labels, probs))
