"""A learner's validation scores, with and without TTA, as the run folder and the bundle record them."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from trainer.metrics import accuracy, log_loss

if TYPE_CHECKING:  # annotations only
    from trainer.learner import ConvLearner


def evaluate(
    learn: ConvLearner, log: Callable[[str], None], *, held_out: bool = True
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Validation metrics with and without TTA; also the TTA probabilities and the labels.

    held_out=False (a --full run trained on these images) only changes what the log line says:
    the numbers are then scores on training images, not an estimate of accuracy on new ones."""
    plain = learn.predict("valid")
    tta, y = learn.TTA()
    metrics = {
        "accuracy": accuracy(plain, y),
        "log_loss": log_loss(plain, y),
        "accuracy_tta": accuracy(tta, y),
        "log_loss_tta": log_loss(tta, y),
    }
    what = "validation" if held_out else "validation (NOT held out: --full trained on these images)"
    log(f"{what}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return metrics, tta, y


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
