"""Everything a checkpoint needs to continue training exactly, and the seeding that starts a run.

A resumed run must equal an uninterrupted one, so the state holds more than weights: the optimizer
(momentum buffers), the freeze level, history, lr history, snapshot names and the global random
generators (dropout and the order of precomputed batches). The image loader's order and
augmentation need none: they follow from (seed, epoch) (see data.EpochSampler). Tensors and plain
Python values only, so a checkpoint loads with torch.load(weights_only=True)."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from trainer.learn.history import EpochStats

if TYPE_CHECKING:  # for annotations only: the learner is passed in, never imported at run time
    from trainer.learn.learner import ConvLearner


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) for a reproducible run."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def capture(learn: ConvLearner) -> dict[str, Any]:
    """The learner's training state, for restore()."""
    np_state = cast(tuple, np.random.get_state(legacy=True))  # (kind, keys, pos, has_gauss, cached)
    return {
        "net": {k: v.detach().cpu() for k, v in learn.net.state_dict().items()},
        "opt": learn.opt.state_dict(),
        "frozen_groups": learn.frozen_groups,
        "bn_frozen": learn.bn_frozen,
        "precompute": learn.precompute,
        "history": [vars(h).copy() for h in learn.history],
        "lr_history": [list(x) for x in learn.lr_history],
        "snapshots": list(learn.snapshots),
        "rng": {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        },
    }


def restore(learn: ConvLearner, state: dict[str, Any]) -> None:
    """Put the learner (and the global random generators) back as capture() found them."""
    learn.net.load_state_dict(state["net"])
    learn.net.to(learn.device)
    learn.freeze_to(state["frozen_groups"])
    learn.bn_frozen = state["bn_frozen"]
    learn.opt.load_state_dict(state["opt"])
    learn.history = [EpochStats(**h) for h in state["history"]]
    learn.lr_history = [list(x) for x in state["lr_history"]]
    learn.snapshots = list(state["snapshots"])
    learn.precompute = state["precompute"]
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(_as_tuple(rng["python"]))
    kind, keys, *rest = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))


def _as_tuple(x):
    """random.setstate wants the nested tuples that a save through torch turned into lists."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
