"""Calibrated probabilities: one temperature fitted on validation after TTA, and the calibration error.

A network fine-tuned on a few hundred images is over- or under-confident: its 0.9 is not right nine
times in ten. Temperature scaling (Guo et al., 2017, "On Calibration of Modern Neural Networks")
divides every logit by one number T fitted to minimise the validation log loss. It cannot change a
single view's argmax, so accuracy stays as it was; the exported graph applies it (InferenceNet's
temperature), so that the probabilities the server returns are the calibrated ones.

With TTA the server averages the views' softmaxes, so T is fitted to that average: the mean over
views of softmax(z_v / T). The views' logits are recovered from their probabilities (log p_v equals
z_v up to a constant per view, which softmax ignores), so no second pass over the images is needed.
Pure NumPy: no model, no files."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from trainer.evaluate.metrics import accuracy, log_loss

N_BINS = 15  # the usual ECE binning (Guo et al.): 15 equal-width bins of confidence
T_RANGE = (0.05, 20.0)  # temperatures searched; a fit at either end says the model is degenerate


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, n_bins: int = N_BINS) -> float:
    """Top-label ECE: the gap between confidence and accuracy, averaged over equal-width confidence
    bins (see reliability) weighted by how many predictions fall in each. 0 is perfect; NaN for no
    predictions."""
    if len(y) == 0:
        return math.nan
    conf, acc, count = reliability(probs, y, n_bins)
    shown = count > 0
    return float(np.sum(count[shown] / count.sum() * np.abs(acc[shown] - conf[shown])))


def reliability(probs: np.ndarray, y: np.ndarray, n_bins: int = N_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per confidence bin: (mean confidence, accuracy, count); NaN where a bin is empty. The data
    of a reliability diagram."""
    probs, y = np.asarray(probs, dtype=np.float64), np.asarray(y)
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == y
    # Bin i holds confidences in (i/n, (i+1)/n]; a confidence of exactly 0 joins the first bin.
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    conf, acc, count = np.full(n_bins, np.nan), np.full(n_bins, np.nan), np.zeros(n_bins, int)
    for b in range(n_bins):
        inside = bins == b
        count[b] = inside.sum()
        if count[b]:
            conf[b], acc[b] = confidence[inside].mean(), correct[inside].mean()
    return conf, acc, count


def scale(per_view: np.ndarray, temperature: float) -> np.ndarray:
    """Each view's probabilities (n, views, classes) as they are with logits divided by temperature."""
    logits = np.log(np.maximum(np.asarray(per_view, dtype=np.float64), np.finfo(np.float32).tiny))
    z = logits / temperature
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _tta_nll(per_view: np.ndarray, y: np.ndarray, temperature: float) -> float:
    return log_loss(scale(per_view, temperature).mean(axis=1), y)


def fit_temperature(per_view: np.ndarray, y: np.ndarray) -> float:
    """The temperature minimising the log loss of the views' averaged probabilities (n, views,
    classes) on labels y: a grid over log T, refined by golden-section search around its best
    point. 1.0 (no change) when there is nothing to fit on."""
    y = np.asarray(y)
    if len(y) == 0:
        return 1.0
    lo, hi = math.log(T_RANGE[0]), math.log(T_RANGE[1])
    grid = np.linspace(lo, hi, 61)
    losses = [_tta_nll(per_view, y, math.exp(t)) for t in grid]
    best = int(np.argmin(losses))
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    phi = (math.sqrt(5) - 1) / 2
    c, d = b - phi * (b - a), a + phi * (b - a)
    fc, fd = _tta_nll(per_view, y, math.exp(c)), _tta_nll(per_view, y, math.exp(d))
    for _ in range(40):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - phi * (b - a)
            fc = _tta_nll(per_view, y, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + phi * (b - a)
            fd = _tta_nll(per_view, y, math.exp(d))
    t = (a + b) / 2
    # The grid point wins if the refinement found nothing better (a flat or noisy curve).
    return float(math.exp(t) if _tta_nll(per_view, y, math.exp(t)) <= losses[best] else math.exp(grid[best]))


def scores(per_view: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """accuracy, log_loss and ece of the plain centre view (view 0 of per_view, (n, views, classes))
    and the same of the views' mean (*_tta)."""
    views, y = np.asarray(per_view), np.asarray(y)
    plain, tta = views[:, 0], views.mean(axis=1)
    return {
        "accuracy": accuracy(plain, y),
        "log_loss": log_loss(plain, y),
        "ece": expected_calibration_error(plain, y),
        "accuracy_tta": accuracy(tta, y),
        "log_loss_tta": log_loss(tta, y),
        "ece_tta": expected_calibration_error(tta, y),
    }


def calibrated_metrics(per_view: np.ndarray, y: np.ndarray, *, tta: bool) -> tuple[dict[str, float], np.ndarray]:
    """Validation scores of views' probabilities (n, views, classes; view 0 the plain centre view)
    before and after a temperature fitted for what the bundle serves by default: the TTA average
    when `tta`, else the centre view alone. Returns (metrics, the calibrated TTA probabilities).

    accuracy / log_loss / ece and their *_tta describe the calibrated model; *_uncalibrated keep
    the scores before (the plain accuracy, which T cannot change, only once); temperature_for_tta
    is 1.0 when T was fitted to the TTA average, 0.0 when to the centre view."""
    y = np.asarray(y)
    temperature = fit_temperature(per_view if tta else np.asarray(per_view)[:, :1], y)
    calibrated = scale(per_view, temperature)
    before = {f"{k}_uncalibrated": v for k, v in scores(per_view, y).items() if k != "accuracy"}
    metrics = {**before, **scores(calibrated, y), "temperature": temperature, "temperature_for_tta": float(tta)}
    return metrics, calibrated.mean(axis=1)


def before_calibration(metrics: Mapping[str, float]) -> dict[str, float]:
    """accuracy, log_loss, accuracy_tta and log_loss_tta as they were before the temperature (the
    *_uncalibrated values where metrics has them): what decides whether TTA is the default, which
    in turn decides what the temperature is fitted to."""
    keys = ("accuracy", "log_loss", "accuracy_tta", "log_loss_tta")
    return {k: metrics.get(f"{k}_uncalibrated", metrics.get(k, math.nan)) for k in keys}


def calibration_line(metrics: Mapping[str, float]) -> str:
    """The temperature and what it did to the probabilities it was fitted to, in one line (log and
    report)."""
    tta = bool(metrics.get("temperature_for_tta", 1.0))
    k = "_tta" if tta else ""
    return (
        f"temperature {metrics['temperature']:.3f} fitted on validation "
        f"{'after TTA' if tta else 'to the centre view (TTA is off by default)'}: expected calibration error "
        f"{metrics[f'ece{k}_uncalibrated']:.4f} -> {metrics[f'ece{k}']:.4f}, {'TTA' if tta else 'centre view'} log loss "
        f"{metrics[f'log_loss{k}_uncalibrated']:.4f} -> {metrics[f'log_loss{k}']:.4f}"
    )
