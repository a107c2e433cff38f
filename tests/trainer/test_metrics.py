"""trainer.evaluate.metrics: accuracy, log loss, confusion matrix and most confused pairs on tiny exact arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainer.evaluate.metrics import EPS, accuracy, confusion_matrix, log_loss, most_confused

CLASSES = ["cat", "dog", "fox"]
# true:      cat cat cat dog dog dog dog fox fox
# predicted: cat dog dog cat fox fox fox fox cat
Y = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2])
PRED = np.array([0, 1, 1, 0, 2, 2, 2, 2, 0])


def one_hot(pred: np.ndarray, n: int = 3) -> np.ndarray:
    """Probabilities whose argmax is `pred`, not exactly one-hot so argmax does the work."""
    probs = np.full((len(pred), n), 0.1 / (n - 1))
    probs[np.arange(len(pred)), pred] = 0.9
    return probs


class TestAccuracyAndLogLoss:
    def test_accuracy(self):
        assert accuracy(one_hot(PRED), Y) == pytest.approx(2 / 9)

    def test_log_loss_clips_zero_probability(self):
        probs = np.array([[1.0, 0.0], [0.5, 0.5]])
        assert log_loss(probs, np.array([1, 0])) == pytest.approx((-math.log(EPS) - math.log(0.5)) / 2)

    def test_empty_is_nan(self):
        assert math.isnan(accuracy(np.zeros((0, 2)), np.array([], dtype=int)))
        assert math.isnan(log_loss(np.zeros((0, 2)), np.array([], dtype=int)))


class TestConfusionMatrix:
    def test_counts(self):
        np.testing.assert_array_equal(confusion_matrix(one_hot(PRED), Y), [[1, 2, 0], [1, 0, 3], [1, 0, 1]])


class TestMostConfused:
    def test_sorted_by_count_then_names(self):
        # dog->fox 3, cat->dog 2, then the ties at 1 in name order; no (x, x) pairs.
        assert most_confused(PRED, Y, CLASSES) == [
            ("dog", "fox", 3),
            ("cat", "dog", 2),
            ("dog", "cat", 1),
            ("fox", "cat", 1),
        ]

    def test_probabilities_give_the_same_pairs(self):
        assert most_confused(one_hot(PRED), Y, CLASSES) == most_confused(PRED, Y, CLASSES)

    @pytest.mark.parametrize(("min_count", "expected"), [(2, [("dog", "fox", 3), ("cat", "dog", 2)]), (4, [])])
    def test_min_count_is_inclusive(self, min_count, expected):
        # fastai's `cm >= min_val`
        assert most_confused(PRED, Y, CLASSES, min_count=min_count) == expected

    def test_min_count_zero_lists_every_wrong_pair_never_a_right_one(self):
        pairs = most_confused(PRED, Y, CLASSES, min_count=0)
        assert len(pairs) == 6 and all(actual != predicted for actual, predicted, _ in pairs)
        assert ("fox", "dog", 0) in pairs

    def test_counts_are_python_ints(self):
        # They go into JSON and the HTML report as they are.
        assert all(type(count) is int for _, _, count in most_confused(PRED, Y, CLASSES))

    def test_ties_ordered_by_name_not_by_index(self):
        classes = ["zebra", "ant"]
        assert most_confused(np.array([1, 0]), np.array([0, 1]), classes) == [("ant", "zebra", 1), ("zebra", "ant", 1)]

    def test_all_right_and_empty(self):
        assert most_confused(Y, Y, CLASSES) == []
        assert most_confused(np.array([], dtype=int), np.array([], dtype=int), CLASSES) == []

    def test_bad_input(self):
        with pytest.raises(ValueError, match="one prediction per label"):
            most_confused(PRED[:3], Y, CLASSES)
        with pytest.raises(ValueError, match="3 class names"):
            most_confused(one_hot(PRED, 4), Y, CLASSES)
        with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 3\)"):
            most_confused(PRED, Y + 1, CLASSES)
