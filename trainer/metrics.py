"""Classification metrics on probability arrays: accuracy, log loss, confusion matrix."""

from __future__ import annotations

import numpy as np

# Probabilities are clipped before the log so that one confident mistake costs -log(1e-15) = 34.5,
# not infinity (the convention of scikit-learn's and Kaggle's log loss).
EPS = 1e-15


def accuracy(probs: np.ndarray, y: np.ndarray) -> float:
    """Fraction of rows whose most probable class is the label."""
    y = np.asarray(y)
    return float((np.asarray(probs).argmax(axis=1) == y).mean()) if len(y) else float("nan")


def log_loss(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log probability of the true class."""
    y = np.asarray(y)
    if not len(y):
        return float("nan")
    p = np.clip(np.asarray(probs, dtype=np.float64)[np.arange(len(y)), y], EPS, 1.0)
    return float(-np.log(p).mean())


def confusion_matrix(probs: np.ndarray, y: np.ndarray, n_classes: int | None = None) -> np.ndarray:
    """counts[true, predicted]."""
    y = np.asarray(y)
    n = n_classes or np.asarray(probs).shape[1]
    counts = np.zeros((n, n), dtype=np.int64)
    np.add.at(counts, (y, np.asarray(probs).argmax(axis=1)), 1)
    return counts
