"""A learner's validation scores, with and without TTA, as the run folder and the bundle record them."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from trainer.evaluate.calibrate import calibrated_metrics, calibration_line, scores
from trainer.outputs.export import choose_tta_default

if TYPE_CHECKING:  # annotations only
    from trainer.learn.learner import ConvLearner


def evaluate(
    learn: ConvLearner, log: Callable[[str], None], *, held_out: bool = True
) -> tuple[dict[str, float], np.ndarray, np.ndarray, np.ndarray]:
    """Validation metrics with and without TTA, before and after calibration (see trainer.evaluate.calibrate,
    whose fitted temperature the learner then keeps); also the TTA probabilities, calibrated and
    before, and the labels. The plain scores are those of TTA's first view, the centre view the server answers a
    call without TTA with.

    held_out=False (a --full run trained on these images) only changes what the log line says:
    the numbers are then scores on training images, not an estimate of accuracy on new ones."""
    per_view = learn.view_probs("valid", temperature=1.0)
    y = np.asarray(learn.labels("valid"))
    # The temperature is fitted to what the bundle will serve by default (see choose_tta_default).
    tta_default, _ = choose_tta_default(scores(per_view, y), held_out=held_out)
    metrics, tta = calibrated_metrics(per_view, y, tta=tta_default)
    learn.temperature = metrics["temperature"]
    what = "validation" if held_out else "validation (NOT held out: --full trained on these images)"
    views = per_view.shape[1]
    log(
        f"{what}, calibrated: centre view accuracy {metrics['accuracy']:.4f}, log loss {metrics['log_loss']:.4f}; "
        f"TTA ({views} views) accuracy {metrics['accuracy_tta']:.4f}, log loss {metrics['log_loss_tta']:.4f}"
    )
    log(f"calibration: {calibration_line(metrics)}")
    return metrics, tta, per_view.mean(axis=1), y


def snapshot_ensemble(
    learn: ConvLearner, names: list[str] | None = None, name: str = "valid", *, tta: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Snapshot ensemble (Huang et al., 2017): the mean of the probabilities of the weights saved
    at the end of each SGDR cycle (default: all of learn.snapshots) on a dataset. Returns (probs,
    labels); the learner's current weights are put back afterwards."""
    names = names or learn.snapshots
    if not names:
        raise ValueError("no snapshots: train with fit(..., cycle_save_name=NAME) first")
    current = {k: v.detach().clone() for k, v in learn.net.state_dict().items()}
    try:
        probs = []
        for snapshot in names:
            learn.load(snapshot)
            probs.append(learn.TTA(name)[0] if tta else learn.predict_files(name))
    finally:
        learn.net.load_state_dict(current)
    return np.mean(probs, axis=0), np.asarray(learn.labels(name))
