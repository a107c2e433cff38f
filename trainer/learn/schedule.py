"""Learning-rate schedules as pure functions of the step: SGDR and the lr finder's sweep.

SGDR (Loshchilov & Hutter, 2017, "SGDR: Stochastic Gradient Descent with Warm Restarts"): within a
cycle the lr follows a half cosine from its maximum down towards zero, one step per mini-batch, and
jumps back to the maximum at the start of the next cycle. Cycle i lasts cycle_len * cycle_mult**i
epochs. The training loop counts steps and passes them in; each function returns one lr per
parameter group, so differential learning rates come for free.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence


def cycle_epochs(n_cycle: int, cycle_len: int = 1, cycle_mult: int = 1) -> list[int]:
    """Epochs in each cycle: fit(lr, 3, cycle_len=1, cycle_mult=2) -> [1, 2, 4] (7 epochs)."""
    if n_cycle < 1 or cycle_len < 1 or cycle_mult < 1:
        raise ValueError(f"n_cycle, cycle_len and cycle_mult must be >= 1, got {n_cycle}, {cycle_len}, {cycle_mult}")
    return [cycle_len * cycle_mult**i for i in range(n_cycle)]


def cycle_boundaries(n_cycle: int, cycle_len: int, cycle_mult: int, steps_per_epoch: int) -> list[int]:
    """The first step of every cycle, plus the total number of steps at the end."""
    bounds = [0]
    for epochs in cycle_epochs(n_cycle, cycle_len, cycle_mult):
        bounds.append(bounds[-1] + epochs * steps_per_epoch)
    return bounds


def cosine(t: float, lr_max: float, lr_min: float = 0.0) -> float:
    """Half cosine from lr_max at t=0 to lr_min at t=1."""
    return lr_min + 0.5 * (lr_max - lr_min) * (1.0 + math.cos(math.pi * t))


def sgdr_lrs(
    step: int,
    lrs: Sequence[float],
    *,
    n_cycle: int,
    cycle_len: int = 1,
    cycle_mult: int = 1,
    steps_per_epoch: int,
) -> list[float]:
    """The lr of every parameter group at `step` (0-based mini-batch count since fit started)."""
    bounds = cycle_boundaries(n_cycle, cycle_len, cycle_mult, steps_per_epoch)
    # 1. find the cycle this step is in; 2. progress through it in [0, 1); 3. cosine of that.
    assert 0 <= step < bounds[-1], f"step {step} outside the schedule's {bounds[-1]} steps"
    start, end = next((a, b) for a, b in itertools.pairwise(bounds) if a <= step < b)
    t = (step - start) / (end - start)
    return [cosine(t, lr) for lr in lrs]


def exponential_lrs(step: int, n_steps: int, lrs_start: Sequence[float], start_lr: float, end_lr: float) -> list[float]:
    """The lr finder's sweep: every group's lr multiplied by the same factor each step, from
    start_lr (for the last group) at step 0 to end_lr at step n_steps - 1, ratios kept."""
    factor = (end_lr / start_lr) ** (step / max(1, n_steps - 1))
    return [lr * factor for lr in lrs_start]


def lr_spread(lr: float, ratio: float, n_groups: int) -> list[float]:
    """Differential learning rates (step 6 of the lesson): the last layer group trains at `lr`, each
    earlier group `ratio` times slower than the next. lr_spread(1e-2, 10, 3) -> [1e-4, 1e-3, 1e-2]."""
    if n_groups < 1 or ratio <= 0:
        raise ValueError(f"n_groups must be >= 1 and ratio > 0, got {n_groups} and {ratio}")
    return [lr / ratio ** (n_groups - 1 - i) for i in range(n_groups)]
