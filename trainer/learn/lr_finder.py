"""The learning-rate finder: an lr range test over one epoch, and a pure suggestion from its curve.

The range test (Smith, 2017, "Cyclical Learning Rates for Training Neural Networks", section 3.3)
trains for a few hundred mini-batches while the lr grows exponentially from tiny to huge, and
records the training loss. The loss first barely moves, then falls, then explodes; a good lr lies
where it is still falling clearly, about an order of magnitude below the minimum. The sweep has
side effects while it runs, so it saves the learner's state first and puts it back afterwards.
"""

from __future__ import annotations

import copy
import io
import itertools
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from serving.bundle.files import write_atomic
from trainer.learn.distributed import Dist
from trainer.learn.schedule import exponential_lrs


class Trainable(Protocol):
    """What the sweep needs of a learner (trainer.learn.learner.ConvLearner is one). Named here, rather
    than imported, so that the learner can offer lr_find without an import circle."""

    @property
    def net(self) -> torch.nn.Module: ...
    @property
    def dist(self) -> Dist: ...
    @property
    def opt(self) -> torch.optim.Optimizer: ...

    def group_values(self, values: Any, name: str) -> list[float]: ...
    def steps_per_epoch(self) -> int: ...
    def grad_scaler(self) -> torch.amp.GradScaler: ...
    def train_mode(self) -> None: ...
    def set_lrs(self, lrs: list[float]) -> None: ...
    def batches(self, name: str, *, train: bool, repeat: int | None = None) -> Iterator[tuple[Any, Any, Callable]]: ...
    def train_step(self, xb: Any, yb: Any, forward: Callable, scaler: torch.amp.GradScaler) -> float: ...


# The plot and the suggestion ignore the first batches (the smoothed loss rests on few batches there)
# and the last ones (the divergence that ended the sweep).
N_SKIP, N_SKIP_END = 10, 5
MIN_POINTS = 5  # fewer than this left after skipping: no curve to read


@dataclass(frozen=True)
class Suggestion:
    """What suggest_lr reads from a curve; `lr` is the one the recipe picks (the valley's)."""

    lr_min_div10: float  # the lesson's rule: the lr at the loss minimum, one order of magnitude lower
    lr_steep: float  # where the loss falls fastest per decade of lr
    lr_valley: float  # the middle of the longest stretch over which the loss keeps falling

    @property
    def lr(self) -> float:
        """The valley's lr (fastai v2's default rule): the minimum/10 rule lands on a noisy
        curve's lowest dip, which after unfreezing can sit two decades below where the loss falls,
        and the steepest point follows a single steep step of the noise."""
        return self.lr_valley


def longest_descent(losses: Sequence[float] | np.ndarray) -> tuple[int, int]:
    """(first, last) index of the longest strictly decreasing subsequence of `losses`: the stretch
    of the sweep over which the loss, read past its noise, keeps falling. O(n**2); a sweep has a
    few hundred points."""
    y = np.asarray(losses, dtype=np.float64)
    n = len(y)
    length, start = np.ones(n, dtype=int), np.arange(n)
    for i in range(1, n):
        earlier = np.flatnonzero((y[:i] > y[i]) & (length[:i] + 1 > length[i]))
        if len(earlier):
            j = earlier[np.argmax(length[earlier])]
            length[i], start[i] = length[j] + 1, start[j]
    end = int(np.argmax(length))  # the first of the longest, where the descent is reached soonest
    return int(start[end]), end


def _window(n: int, n_skip: int, n_skip_end: int) -> slice:
    if n - n_skip - n_skip_end < MIN_POINTS:
        raise ValueError(
            f"lr_find stopped after {n} batches, too few to read a curve from (the first {n_skip} and last "
            f"{n_skip_end} are skipped, at least {MIN_POINTS} must remain): use a smaller start_lr or more data"
        )
    return slice(n_skip, n - n_skip_end)


def suggest_lr(
    lrs: Sequence[float], losses: Sequence[float], *, n_skip: int = N_SKIP, n_skip_end: int = N_SKIP_END
) -> Suggestion:
    """Suggested lrs from a sweep's (lr, smoothed loss) pairs, lrs increasing, all positive.

    The first `n_skip` and last `n_skip_end` points are ignored, as in the plot. Raises ValueError when
    fewer than MIN_POINTS remain."""
    x, y = np.asarray(lrs, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"suggest_lr needs one loss per lr, got {x.shape} lrs and {y.shape} losses")
    if (x <= 0).any():
        raise ValueError("suggest_lr: every lr must be positive (the curve is read against log10(lr))")
    w = _window(len(x), n_skip, n_skip_end)
    x, y = x[w], y[w]
    # np.gradient handles uneven spacing, so a sweep cut short or resampled still reads right.
    slope = np.gradient(y, np.log10(x))
    first, last = longest_descent(y)
    return Suggestion(
        lr_min_div10=float(x[np.nanargmin(y)] / 10),
        lr_steep=float(x[np.nanargmin(slope)]),
        # Halfway along the descent in log(lr): past its flat start, short of the minimum.
        lr_valley=float(math.sqrt(x[first] * x[last])),
    )


@dataclass
class SmoothedLoss:
    """The sweep's loss record and divergence test, fed one raw loss per batch; no torch.

    smoothed[i] = avg_i / (1 - beta**(i+1)) with avg_i = beta*avg_{i-1} + (1-beta)*loss_i: an
    exponential moving average, bias-corrected so the first values are not pulled towards zero."""

    beta: float = 0.98
    warmup: int = 10  # batches before the best loss counts: the first smoothed values rest on few batches
    div_factor: float = 4.0
    raw: list[float] = field(default_factory=list, init=False)
    smoothed: list[float] = field(default_factory=list, init=False)
    best: float = field(default=math.inf, init=False)
    _avg: float = field(default=0.0, init=False, repr=False)

    def update(self, loss: float) -> float:
        self._avg = self.beta * self._avg + (1 - self.beta) * loss
        value = self._avg / (1 - self.beta ** (len(self.raw) + 1))
        self.raw.append(float(loss))
        self.smoothed.append(value)
        if len(self.smoothed) > self.warmup and value < self.best:
            self.best = value
        return value

    def diverged(self) -> bool:
        """The last smoothed loss is NaN or more than div_factor times the best one."""
        value = self.smoothed[-1]
        return math.isnan(value) or value > self.div_factor * self.best


@dataclass
class LRFinderResult:
    """One sweep, a point per batch: what lr_find returns, to plot and read a suggestion from."""

    lrs: list[float]  # the last layer group's lr per batch: with differential lrs the plot shows that one
    losses: list[float]  # smoothed training loss
    raw_losses: list[float]

    def suggestion(self) -> Suggestion:
        return suggest_lr(self.lrs, self.losses)

    def plot(self, path: Path | str, n_skip: int = N_SKIP, n_skip_end: int = N_SKIP_END) -> Path:
        """Smoothed loss against lr (log scale) as a PNG, the suggested lr marked. Raises ValueError
        when the sweep is too short to read."""
        w, s = _window(len(self.lrs), n_skip, n_skip_end), self.suggestion()
        fig, ax = _figure()
        ax.plot(self.lrs[w], self.losses[w])
        first, last = longest_descent(np.asarray(self.losses)[w])
        ax.axvspan(self.lrs[w][first], self.lrs[w][last], color="tab:red", alpha=0.08, label="longest descent")
        ax.axvline(s.lr, color="tab:red", linestyle="--", label=f"suggested lr {s.lr:.1e} (its middle)")
        ax.axvline(s.lr_min_div10, color="tab:grey", linestyle="-.", label=f"minimum / 10: {s.lr_min_div10:.1e}")
        ax.axvline(s.lr_steep, color="tab:green", linestyle=":", label=f"steepest descent {s.lr_steep:.1e}")
        ax.set(xscale="log", xlabel="learning rate (last layer group)", ylabel="smoothed training loss")
        ax.legend()
        return _save_png(fig, path)

    def plot_lr(self, path: Path | str) -> Path:
        """The last layer group's lr per iteration (log scale) as a PNG."""
        fig, ax = _figure()
        ax.plot(self.lrs)
        ax.set(yscale="log", xlabel="iteration", ylabel="learning rate (last layer group)")
        return _save_png(fig, path)


def _figure():
    # The Agg canvas directly, not pyplot: no global figure state and no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="tight")
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _save_png(fig, path: Path | str) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    write_atomic(Path(path), buf.getvalue())  # a reader never sees half a PNG
    return Path(path)


def lr_find(
    learn: Trainable,
    start_lr=1e-5,
    end_lr=10,
    num_it: int | None = None,
    *,
    beta: float = 0.98,
    stop_div: bool = True,
) -> LRFinderResult:
    """Smith's lr range test on a learner (a ConvLearner); its state is left exactly as it was.

    Trains on `num_it` training batches (default: one epoch; the loader is cycled when an epoch is
    shorter) while every layer group's lr is multiplied by the same factor each batch. `start_lr` is
    one value or one per layer group (`lr_find(learn, lrs / 1000)` keeps the differential ratios);
    `end_lr` is the last group's final lr, or one per group with the same ratios. Stops early when the
    smoothed loss is NaN or, with `stop_div`, above 4x the best after the first 10 batches.

    Afterwards the weights, buffers, optimizer state and settings, requires_grad flags and train/eval
    modes are restored, also on error; gradients are left as None (fit clears them before each step).
    """
    starts = learn.group_values(start_lr, "start_lr")
    if isinstance(end_lr, numbers.Real):
        end = float(end_lr)  # the last group's, as in the lesson: lr_find(lrs / 1000) sweeps lrs[-1] to 10
    else:
        ends = learn.group_values(end_lr, "end_lr")
        end = ends[-1]
        if not np.allclose(np.divide(ends, starts), end / starts[-1]):
            raise ValueError(
                f"lr_find multiplies every group by one factor: end_lr {ends} must keep the ratios of start_lr {starts}"
            )
    if min(starts) <= 0 or end <= starts[-1]:
        raise ValueError(f"lr_find needs 0 < start_lr < end_lr, got start_lr={start_lr}, end_lr={end_lr}")
    if num_it is not None and num_it < 1:
        raise ValueError(f"lr_find: num_it must be at least 1 (or None for one epoch), got {num_it}")
    n_steps = num_it if num_it is not None else learn.steps_per_epoch()
    saved = _save_state(learn)
    try:
        return _sweep(learn, starts, end, n_steps, beta, stop_div)
    finally:
        _restore_state(learn, saved)


def _sweep(
    learn: Trainable, starts: list[float], end_lr: float, n_steps: int, beta: float, stop_div: bool
) -> LRFinderResult:
    record, lrs = SmoothedLoss(beta=beta), []
    scaler = learn.grad_scaler()
    learn.train_mode()
    bar = tqdm(
        itertools.islice(_cycle(learn), n_steps),
        total=n_steps,
        desc="lr_find",
        unit="batch",
        leave=False,
        disable=not learn.dist.is_main,  # one bar for a distributed run
    )
    for step, (xb, yb, forward) in enumerate(bar):
        group_lrs = exponential_lrs(step, n_steps, starts, starts[-1], end_lr)
        learn.set_lrs(group_lrs)
        # The step of ConvLearner.fit, so the sweep measures the training that will follow.
        loss = learn.train_step(xb, yb, forward, scaler)
        lrs.append(group_lrs[-1])
        smoothed = record.update(loss)
        bar.set_postfix(lr=f"{group_lrs[-1]:.1e}", loss=f"{smoothed:.4f}")
        if math.isnan(smoothed) or (stop_div and record.diverged()):
            break  # past here the loss only climbs (or stays NaN): nothing more to read from the curve
    bar.close()
    return LRFinderResult(lrs, record.smoothed, record.raw)


def _cycle(learn: Trainable):
    """Training batches without end, reshuffled every epoch."""
    while True:
        empty = True
        for batch in learn.batches("train", train=True):
            empty = False
            yield batch
        if empty:
            raise ValueError("lr_find: the training set gives no batches of two or more images; add training data")


def _save_state(learn: Trainable) -> dict:
    return {
        "net": copy.deepcopy(learn.net.state_dict()),
        "opt": copy.deepcopy(learn.opt.state_dict()),
        "requires_grad": [(p, p.requires_grad) for p in learn.net.parameters()],
        "training": [(m, m.training) for m in learn.net.modules()],
    }


def _restore_state(learn: Trainable, saved: dict) -> None:
    # load_state_dict copies into the existing tensors, so the optimizer's references stay valid.
    learn.net.load_state_dict(saved["net"])
    learn.opt.load_state_dict(saved["opt"])
    learn.opt.zero_grad(set_to_none=True)
    for p, flag in saved["requires_grad"]:
        p.requires_grad_(flag)
    for m, flag in saved["training"]:
        m.training = flag
