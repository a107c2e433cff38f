"""SGDR schedule as a pure function of the step: exact values without a model."""

from __future__ import annotations

import math

import pytest

from trainer.learn.schedule import cycle_boundaries, cycle_epochs, lr_spread, sgdr_lrs


class TestSGDR:
    def test_cycle_mult_doubles_cycles(self):
        assert cycle_epochs(3, cycle_len=1, cycle_mult=2) == [1, 2, 4]
        assert cycle_boundaries(3, 1, 2, steps_per_epoch=10) == [0, 10, 30, 70]

    @pytest.mark.parametrize("step, expected", [(0, 1.0), (5, 0.5), (10, 1.0), (20, 0.5), (30, 1.0), (50, 0.5)])
    def test_exact_points(self, step, expected):
        lrs = sgdr_lrs(step, [0.1, 1.0], n_cycle=3, cycle_len=1, cycle_mult=2, steps_per_epoch=10)
        assert lrs == pytest.approx([0.1 * expected, expected])

    def test_last_step_is_near_zero_and_past_the_end_is_an_error(self):
        last = sgdr_lrs(69, [1.0], n_cycle=3, cycle_mult=2, steps_per_epoch=10)[0]
        assert last == pytest.approx(0.5 * (1 + math.cos(math.pi * 39 / 40)))
        with pytest.raises(AssertionError):
            sgdr_lrs(70, [1.0], n_cycle=3, cycle_mult=2, steps_per_epoch=10)


class TestLrSpread:
    @pytest.mark.parametrize(
        "ratio, n, expected",
        [
            (10, 3, [1e-4, 1e-3, 1e-2]),
            (3, 3, [1e-2 / 9, 1e-2 / 3, 1e-2]),
            (10, 5, [1e-6, 1e-5, 1e-4, 1e-3, 1e-2]),  # as many groups as the model has, not always three
            (10, 1, [1e-2]),
            (1, 3, [1e-2] * 3),
        ],
    )
    def test_each_earlier_group_is_ratio_times_slower(self, ratio, n, expected):
        assert lr_spread(1e-2, ratio, n) == pytest.approx(expected)

    def test_nonsense_is_an_error(self):
        with pytest.raises(ValueError):
            lr_spread(1e-2, 10, 0)
