"""The demo's sample of predictions shows every class before any class twice."""

from __future__ import annotations

from trainer.demo import one_per_class


def test_takes_the_classes_in_turn():
    labels = [0, 0, 0, 1, 1, 2]
    assert one_per_class(labels, 4) == [0, 3, 5, 1]
    assert one_per_class(labels, 10) == [0, 3, 5, 1, 4, 2]


def test_a_sorted_validation_set_is_not_all_of_its_first_class():
    labels = [c for c in range(10) for _ in range(30)]  # as the digits' folders list them
    assert sorted(labels[i] for i in one_per_class(labels, 8)) == list(range(8))


def test_empty():
    assert one_per_class([], 5) == []
