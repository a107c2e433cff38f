"""Classification metrics on probability arrays: accuracy, log loss, confusion matrix, most confused pairs."""

from __future__ import annotations

from collections.abc import Sequence

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


def most_confused(
    probs_or_pred: np.ndarray, y: np.ndarray, classes: Sequence[str], min_count: int = 1
) -> list[tuple[str, str, int]]:
    """The off-diagonal cells of the confusion matrix with at least `min_count` images, as
    (actual, predicted, count) with class names, most images first and ties in name order: fastai's
    `ClassificationInterpretation.most_confused(min_val)`.

    `probs_or_pred` is either (n_images, n_classes) probabilities (the predicted class is the most
    probable) or (n_images,) predicted class indices; `y` holds the true class indices and `classes`
    names every class. Raises ValueError when the shapes disagree or an index names no class."""
    pred = np.asarray(probs_or_pred)
    if pred.ndim == 2:
        if pred.shape[1] != len(classes):
            raise ValueError(f"most_confused: probs have {pred.shape[1]} columns for {len(classes)} class names")
        pred = pred.argmax(axis=1)
    y = np.asarray(y)
    if pred.ndim != 1 or y.shape != pred.shape:
        raise ValueError(f"most_confused: need one prediction per label, got shapes {pred.shape} and {y.shape}")
    n = len(classes)
    for name, idx in (("labels", y), ("predictions", pred)):
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"most_confused: {name} must be class indices in [0, {n}), got {idx.min()}..{idx.max()}")
    counts = np.zeros((n, n), dtype=np.int64)
    np.add.at(counts, (y.astype(np.int64), pred.astype(np.int64)), 1)
    # The diagonal is masked, not zeroed as fastai does, so that min_count=0 lists every wrong pair
    # and never a right one.
    rows, cols = np.nonzero((counts >= min_count) & ~np.eye(n, dtype=bool))
    pairs = [
        (str(classes[i]), str(classes[j]), int(counts[i, j])) for i, j in zip(rows.tolist(), cols.tolist(), strict=True)
    ]
    return sorted(pairs, key=lambda p: (-p[2], p[0], p[1]))
