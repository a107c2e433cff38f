"""Training runs for tests/trainer/test_distributed.py: under torchrun (each rank one process) or alone.

    python tests/trainer/ddp_worker.py DATA OUT BS [exact]
    python tests/trainer/ddp_worker.py die-after N RANK trainer-run-args...

Trains the head on precomputed activations, then with augmentation, then unfrozen, each for a cycle,
and writes OUT/rank<r>.pt (its weights and buffers) and OUT/rank<r>.json (its epochs and TTA).
Not a test module (no test_ prefix): it runs in processes of its own.

`die-after N RANK`: `trainer run` with those arguments, whose process of rank RANK dies (exits 1)
once N epochs are trained and checkpointed, as a crashed or killed process would; the others are
left to torchrun, which must stop them rather than leave them waiting for it.

`exact`: a model whose output for an image does not depend on the rest of its batch (no dropout,
the head's BatchNorm replaced by identity, the backbone's frozen on its ImageNet statistics), so
that ranks with bs images each must train exactly as one process with bs * ranks; without it, the
lesson's model, whose BatchNorm sees bs images per rank.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from trainer.data.augment import tfms_from_model, transforms_side_on
from trainer.data.loaders import ImageClassifierData
from trainer.evaluate.metrics import accuracy
from trainer.learn import distributed
from trainer.learn.learner import ConvLearner


def main(data_dir: Path, out: Path, bs: int, exact: bool) -> None:
    d = distributed.init()
    torch.manual_seed(0)
    tfms = tfms_from_model("efficientnet_lite0", 32, aug_tfms=transforms_side_on, max_zoom=1.1)
    data = ImageClassifierData.from_paths(data_dir, tfms, bs=bs, num_workers=0, seed=0)
    learn = ConvLearner.pretrained(
        "efficientnet_lite0",
        data,
        ps=(0.0, 0.0) if exact else (0.25, 0.5),
        dist=d,
        work_dir=out / "work",
        models_dir=out / "models",
    )
    if exact:
        for i, m in enumerate(learn.net.head):
            if isinstance(m, torch.nn.BatchNorm1d):
                learn.net.head[i] = torch.nn.Identity()
        learn.opt = learn._make_optimizer()
        learn.bn_freeze(True)
    learn.fit(1e-2, 2)
    learn.precompute = False
    learn.fit(1e-2, 1)
    learn.unfreeze()
    learn.fit([1e-4, 1e-3, 1e-2], 1)
    learn.save("final")
    probs, y = learn.TTA()
    state = {k: v.detach().cpu() for k, v in learn.net.state_dict().items()}
    torch.save(state, out / f"rank{d.rank}.pt")
    (out / f"rank{d.rank}.json").write_text(
        json.dumps(
            {
                "history": [[s.trn_loss, s.val_loss, s.accuracy] for s in learn.history],
                "tta_accuracy": accuracy(probs, y),
                "tta_probs": np.asarray(probs).tolist(),
                "steps_per_epoch": learn.steps_per_epoch(),
            }
        )
    )
    distributed.shutdown()


def dying_run(n_epochs: int, rank: int, argv: list[str]) -> int:
    from trainer import cli

    fit = ConvLearner.fit

    def fit_then_die(self, *args, on_epoch_end, **kwargs):
        def end(epochs: int) -> None:
            on_epoch_end(epochs)  # the recipe's checkpoint
            if len(self.history) == n_epochs and self.dist.rank == rank:
                raise SystemExit(f"rank {rank} died after {n_epochs} epochs")

        return fit(self, *args, on_epoch_end=end, **kwargs)

    ConvLearner.fit = fit_then_die  # type: ignore[method-assign]
    return cli.main(argv)


if __name__ == "__main__":
    if sys.argv[1] == "die-after":
        sys.exit(dying_run(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]))
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:] == ["exact"])
