"""fastai's side of bench/training.py; runs only in the fastai virtualenv (bench/README.md says how to make it).

    fit:    our network and loaders, one epoch by fastai's Learner and one by ConvLearner.fit,
            alternating, `--reps` times each; the seconds of every epoch.
    recipe: fastai's own recipe on the same images and split: its data pipeline (presizing, batch
            augmentation), our pretrained network passed in (nothing is downloaded), fine_tune.

Writes its figures to --json. fastai is never a dependency of the project: this file is excluded
from mypy, which checks the project's own virtualenv.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

# `python bench/fastai_peer.py` puts bench/ first on sys.path, where bench/serving.py would hide the
# serving package that trainer imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
from fastai.callback.core import Callback  # noqa: E402
from fastai.data.core import DataLoaders  # noqa: E402
from fastai.learner import Learner  # noqa: E402
from fastai.metrics import accuracy  # noqa: E402
from fastai.optimizer import OptimWrapper  # noqa: E402
from fastai.vision.all import (  # noqa: E402
    CategoryBlock,
    DataBlock,
    ImageBlock,
    IndexSplitter,
    Resize,
    aug_transforms,
)
from torch import nn  # noqa: E402


def _training():
    """bench/training.py, the same set-up as our side, loaded by path: bench/ on sys.path would let
    bench/serving.py hide the serving package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_training", Path(__file__).resolve().with_name("training.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


training = _training()


class Pixels(Callback):
    """Our network takes float pixels 0-255 (it normalises itself): from our loaders' uint8, or from
    fastai's floats 0-1."""

    def __init__(self, scale: float):
        self.scale = scale

    def before_batch(self):
        self.learn.xb = (self.xb[0].float() * self.scale,)


class RecipeMode(Callback):
    """As our unfrozen stage trains: BatchNorm of the backbone on its ImageNet statistics (bn_freeze),
    and each epoch's own order and augmentation from our EpochSampler."""

    order = 1  # after TrainEvalCallback's model.train()

    def __init__(self, net, sampler=None):
        self.net, self.sampler = net, sampler

    def before_train(self):
        for m in self.net.backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()

    def before_epoch(self):
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch)


def _splitter(net):
    return [list(g.parameters()) for g in net.layer_groups()]


def fit(args) -> dict:
    """Alternating epochs of fastai's Learner and ours over one network, loader and optimizer type."""
    setup = training.Setup(args.data, args.val_name, args.size, args.bs, args.reps)
    work = Path(args.work)
    learn = training.make_learner(setup, work)
    learn.precompute = False
    learn.unfreeze()
    lrs = training.recipe_lrs(learn)
    wd = training.run_config(setup, work / "run").wd
    data = learn.data
    train_dl = data.loader("train", augment=True, shuffle=True)
    dls = DataLoaders(train_dl, data.loader("valid"), device=torch.device("cpu"))
    peer = Learner(
        dls,
        learn.net,
        loss_func=nn.CrossEntropyLoss(label_smoothing=learn.label_smoothing),
        opt_func=partial(OptimWrapper, opt=torch.optim.SGD, momentum=learn.momentum),
        splitter=_splitter,
        metrics=accuracy,
        wd=wd,
        cbs=[Pixels(1.0), RecipeMode(learn.net, train_dl.sampler)],
    )

    def fastai_epoch():
        with peer.no_bar(), peer.no_logging():
            peer.fit(1, lr=lrs)

    fastai_epoch()  # warm-up: the optimizer, the loaders' workers
    times = training.interleave({"fastai": fastai_epoch, "ours": lambda: learn.fit(lrs, 1, wds=wd)}, args.reps)
    return times


def recipe(args) -> dict:
    """fastai's fine_tune with its own data pipeline on our split, and our pretrained network."""
    setup = training.Setup(args.data, args.val_name, args.size, args.bs, 1, csv=args.csv)
    work = Path(args.work)
    started = time.perf_counter()
    ours = training.make_learner(setup, work)  # our files, labels and split; our network
    if args.layout == "contiguous":
        # fastai's default: the network in PyTorch's default memory layout, as timm builds it. Our
        # learner keeps it channels_last, which is one of our recipe's choices, not fastai's.
        ours.net.to(memory_format=torch.contiguous_format)
    data = ours.data
    files = [*data.trn_files, *data.val_files]
    label = dict(zip(files, [data.classes[y] for y in (*data.trn_y, *data.val_y)], strict=True))
    block = DataBlock(
        blocks=(ImageBlock, CategoryBlock(vocab=data.classes)),
        get_items=lambda _: files,
        get_y=lambda f: label[f],
        splitter=IndexSplitter(range(len(data.trn_files), len(files))),
        # fastai's presizing (its book, chapter 5): a large resize per item, then augmentation and
        # the final crop per batch.
        item_tfms=Resize(round(args.size * 460 / 224)),
        batch_tfms=aug_transforms(size=args.size, min_scale=0.75),
    )
    dls = block.dataloaders(args.data, bs=args.bs, num_workers=data.num_workers, device=torch.device("cpu"))
    peer = Learner(dls, ours.net, splitter=_splitter, metrics=accuracy, cbs=[Pixels(255.0)], model_dir=work / "models")
    curve = []

    class Curve(Callback):
        order = 90  # after the Recorder has the epoch's metrics

        def after_epoch(self):
            curve.append((float(self.recorder.values[-1][2]), time.perf_counter() - started))

    with peer.no_bar(), peer.no_logging():
        peer.fine_tune(args.epochs, cbs=[Curve()])
        probs, targets = peer.get_preds(dl=dls.valid)  # softmax of the last epoch's model, uncalibrated
    seconds = time.perf_counter() - started
    from trainer.evaluate.calibrate import expected_calibration_error
    from trainer.evaluate.metrics import accuracy as our_accuracy
    from trainer.evaluate.metrics import log_loss

    p, y = probs.float().numpy(), targets.numpy()
    return {
        "seconds": seconds,
        "accuracy": our_accuracy(p, y),
        "log_loss": log_loss(p, y),
        "ece": expected_calibration_error(p, y),
        "curve": curve,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("fit", "recipe"))
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--val-name", default="val")
    parser.add_argument("--csv", default=None, help="recipe: a labels CSV under --data (our random fifth validates)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--bs", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4, help="recipe: fine_tune's unfrozen epochs (after 1 frozen)")
    parser.add_argument(
        "--layout",
        choices=("contiguous", "channels_last"),
        default="contiguous",
        help="recipe: the network's memory layout (fastai's default: contiguous)",
    )
    parser.add_argument("--work", default=None, help="caches (default: a temporary folder)")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    import tempfile

    import fastai

    args.work = args.work or tempfile.mkdtemp(prefix="fastai-peer-")
    figures = fit(args) if args.mode == "fit" else recipe(args)
    figures["versions"] = f"fastai {fastai.__version__}, torch {torch.__version__}"
    args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
