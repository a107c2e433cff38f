"""Temperature scaling and the expected calibration error: pure NumPy, checked on data whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainer.evaluate.calibrate import (
    before_calibration,
    calibrated_metrics,
    calibration_line,
    expected_calibration_error,
    fit_temperature,
    reliability,
    scale,
    scores,
)
from trainer.evaluate.metrics import log_loss


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def sample(n: int, true_t: float, views: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Views' probabilities softmax(z) of n items whose labels are drawn from softmax(z / true_t):
    a model whose logits are true_t times too large (over-confident when true_t > 1)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, size=(n, 1, 4)) + rng.normal(0, 0.3, size=(n, views, 4))
    truth = softmax(z.mean(axis=1) / true_t)
    y = np.array([rng.choice(4, p=p) for p in truth])
    return softmax(z), y


class TestFitTemperature:
    @pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
    def test_recovers_the_temperature_the_labels_were_drawn_with(self, true_t):
        per_view, y = sample(20000, true_t)
        assert fit_temperature(per_view, y) == pytest.approx(true_t, rel=0.06)

    def test_lowers_the_log_loss_of_an_overconfident_tta_average(self):
        per_view, y = sample(3000, 2.0, views=4)
        t = fit_temperature(per_view, y)
        before = log_loss(per_view.mean(axis=1), y)
        after = log_loss(scale(per_view, t).mean(axis=1), y)
        assert t > 1.3 and after < before - 0.02
        # The minimum: a little either side is worse.
        for other in (t * 0.9, t * 1.1):
            assert log_loss(scale(per_view, other).mean(axis=1), y) >= after

    def test_nothing_to_fit_on_leaves_the_model_as_it_is(self):
        assert fit_temperature(np.empty((0, 2, 3)), np.empty(0, int)) == 1.0


class TestScale:
    def test_temperature_one_is_the_identity_and_rows_sum_to_one(self):
        per_view, _ = sample(50, 1.0, views=3)
        np.testing.assert_allclose(scale(per_view, 1.0), per_view, atol=1e-12)
        np.testing.assert_allclose(scale(per_view, 3.0).sum(axis=-1), 1.0, atol=1e-12)

    def test_divides_the_logits(self):
        z = np.array([[[2.0, 0.0, -1.0]]])
        np.testing.assert_allclose(scale(softmax(z), 2.0), softmax(z / 2.0), atol=1e-12)

    def test_a_probability_of_zero_stays_finite(self):
        out = scale(np.array([[[1.0, 0.0]]]), 2.0)
        assert np.isfinite(out).all() and out[0, 0, 0] > 0.99


class TestECE:
    def test_by_hand(self):
        # Two in the (0.8, 0.867] bin: confidence 0.85 each, one right: gap 0.35, weight 1/2.
        # Two in the (0.533, 0.6] bin: confidence 0.6 each, both right: gap 0.4, weight 1/2.
        probs = np.array([[0.85, 0.15], [0.15, 0.85], [0.6, 0.4], [0.4, 0.6]])
        y = np.array([0, 0, 0, 1])
        assert expected_calibration_error(probs, y) == pytest.approx(0.5 * 0.35 + 0.5 * 0.4)

    def test_calibrated_labels_score_near_zero_and_overconfidence_does_not(self):
        per_view, y = sample(20000, 1.0)
        assert expected_calibration_error(per_view[:, 0], y) < 0.02
        per_view, y = sample(20000, 3.0)
        assert expected_calibration_error(per_view[:, 0], y) > 0.1

    def test_no_predictions_is_nan(self):
        assert math.isnan(expected_calibration_error(np.empty((0, 3)), np.empty(0, int)))

    def test_reliability_bins_count_every_prediction(self):
        per_view, y = sample(500, 2.0)
        conf, acc, count = reliability(per_view[:, 0], y)
        assert count.sum() == 500
        shown = count > 0
        assert np.all((conf[shown] >= 0) & (conf[shown] <= 1) & (acc[shown] >= 0) & (acc[shown] <= 1))
        assert np.isnan(conf[~shown]).all()


class TestCalibratedMetrics:
    def test_scores_before_and_after_with_the_fitted_temperature(self):
        per_view, y = sample(4000, 2.0, views=4, seed=1)
        metrics, probs = calibrated_metrics(per_view, y, tta=True)
        t = metrics["temperature"]
        assert t == fit_temperature(per_view, y) and metrics["temperature_for_tta"] == 1.0
        np.testing.assert_allclose(probs, scale(per_view, t).mean(axis=1))
        assert metrics["log_loss_tta"] == pytest.approx(log_loss(probs, y))
        assert metrics["log_loss_tta_uncalibrated"] == pytest.approx(log_loss(per_view.mean(axis=1), y))
        assert metrics["log_loss_tta"] < metrics["log_loss_tta_uncalibrated"]
        assert metrics["ece_tta"] < metrics["ece_tta_uncalibrated"]
        assert metrics["log_loss"] < metrics["log_loss_uncalibrated"]
        # One view's argmax cannot move with T: a single plain accuracy, unchanged.
        assert metrics["accuracy"] == pytest.approx((per_view[:, 0].argmax(1) == y).mean())
        assert "accuracy_uncalibrated" not in metrics
        line = calibration_line(metrics)
        assert f"{t:.3f}" in line and f"{metrics['ece_tta']:.4f}" in line and "after TTA" in line

    def test_without_tta_the_temperature_is_fitted_to_the_centre_view_that_is_served(self):
        per_view, y = sample(4000, 2.0, views=4, seed=2)
        per_view[:, 1:] = per_view[:, 1:] ** 0.3  # other views far less confident: they must not pull T
        per_view[:, 1:] /= per_view[:, 1:].sum(axis=-1, keepdims=True)
        metrics, _ = calibrated_metrics(per_view, y, tta=False)
        assert metrics["temperature"] == fit_temperature(per_view[:, :1], y) != fit_temperature(per_view, y)
        assert metrics["temperature_for_tta"] == 0.0
        assert metrics["log_loss"] < metrics["log_loss_uncalibrated"]
        assert "centre view" in calibration_line(metrics) and f"{metrics['ece']:.4f}" in calibration_line(metrics)

    def test_before_calibration_reads_the_uncalibrated_scores_where_recorded(self):
        per_view, y = sample(500, 2.0, views=2)
        metrics, _ = calibrated_metrics(per_view, y, tta=True)
        before = before_calibration(metrics)
        assert before == {k: v for k, v in scores(per_view, y).items() if not k.startswith("ece")}
        assert before_calibration({"accuracy": 1.0, "log_loss": 0.0}) == pytest.approx(
            {"accuracy": 1.0, "log_loss": 0.0, "accuracy_tta": math.nan, "log_loss_tta": math.nan}, nan_ok=True
        )
