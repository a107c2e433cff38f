"""The lesson's recipe as one function over a typed configuration: train, evaluate with TTA, export."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from serving.bundle import write_atomic
from trainer import augment
from trainer.data import ImageClassifierData
from trainer.learner import ConvLearner, seed_everything
from trainer.metrics import accuracy, log_loss

FINAL = "final"  # the trained weights, saved as <run>/models/final.pt

AUGMENTATIONS = {
    "side_on": augment.transforms_side_on,
    "top_down": augment.transforms_top_down,
    "basic": augment.transforms_basic,
    "none": [],
}


class RunConfig(BaseModel):
    """Everything a run depends on; written beside its outputs so that it can be re-run."""

    model_config = ConfigDict(extra="forbid")

    data: Path | None = Field(None, description="dataset folder (train/, valid/ with one folder per class); none: the embedded digits")
    out: Path = Field(Path("runs/latest"), description="run folder: config, epoch table, bundle/")
    val_name: str = Field("valid", description="name of the validation folder under --data")
    arch: str = Field("efficientnet_lite0", description="backbone architecture")
    weights: Path | None = Field(None, description="local ImageNet weights file for the backbone")
    size: int = Field(224, ge=16, le=1024, description="network input side, pixels")
    crop_pct: float = Field(0.875, ge=0.5, le=1.0, description="centre crop as a fraction of the resized shorter side")
    aug: Literal["side_on", "top_down", "basic", "none"] = Field("side_on", description="training augmentation family")
    max_zoom: float = Field(1.1, ge=1.0, le=2.0, description="largest random zoom in training")
    bs: int = Field(64, ge=2, description="mini-batch size, images")
    lr: float | None = Field(None, gt=0, description="lr of the head (last layer group); none: lr_find picks it")
    lr_ratio: float = Field(10.0, ge=1.0, description="each earlier layer group trains this many times slower (3 for satellite/medical)")
    head_epochs: int = Field(2, ge=0, description="step 3: epochs of the head on precomputed activations")
    aug_cycles: int = Field(3, ge=0, description="step 4: cycles (cycle_len=1) of the head with augmentation")
    unfreeze_cycles: int = Field(3, ge=0, description="step 8: cycles of all layers, cycle_len=1, cycle_mult=2 (3 -> 7 epochs)")
    num_workers: int = Field(2, ge=0, description="data-loading worker processes")
    seed: int = Field(42, description="seed for reproducible runs")
    name: str = Field("classifier", description="model name recorded in the bundle")

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        from trainer.model import get_arch

        get_arch(arch)  # raises with the list of known architectures
        return arch


def run(cfg: RunConfig, log=print) -> tuple[ConvLearner, dict[str, float]]:
    """Train as configured, evaluate with TTA, export `cfg.out / "bundle"`; return the learner and metrics."""
    from trainer.digits import materialise_digits
    from trainer.export import export

    seed_everything(cfg.seed)
    cfg.out.mkdir(parents=True, exist_ok=True)
    write_atomic(cfg.out / "config.json", (cfg.model_dump_json(indent=2) + "\n").encode())
    data_path = cfg.data or materialise_digits(cfg.out / "digits")
    tfms = augment.tfms_from_model(
        cfg.arch, cfg.size, aug_tfms=AUGMENTATIONS[cfg.aug], max_zoom=cfg.max_zoom, crop_pct=cfg.crop_pct
    )
    data = ImageClassifierData.from_paths(
        data_path, tfms, bs=cfg.bs, val_name=cfg.val_name, num_workers=cfg.num_workers, seed=cfg.seed
    )
    log(f"data: {len(data.trn_files)} train, {len(data.val_files)} valid images, {data.c} classes")
    learn = ConvLearner.pretrained(
        cfg.arch, data, precompute=True, weights=cfg.weights, models_dir=cfg.out / "models", log=log
    )
    # Steps 1-2: augmentation is set and activations precomputed; find the head's lr.
    # On precomputed activations a sweep is cheap: at least 100 batches, cycling a small dataset.
    lr = cfg.lr or _find_lr(learn, cfg.out / "lr_find.png", log, num_it=max(100, learn.steps_per_epoch()))
    log("epoch, trn_loss, val_loss, accuracy")
    if cfg.head_epochs:  # step 3: the head on precomputed activations
        learn.fit(lr, cfg.head_epochs)
    learn.precompute = False
    if cfg.aug_cycles:  # step 4: the head with fresh augmentation every epoch
        learn.fit(lr, cfg.aug_cycles, cycle_len=1)
    if cfg.unfreeze_cycles:
        learn.unfreeze()  # step 5
        ratios = [1 / cfg.lr_ratio**2, 1 / cfg.lr_ratio, 1.0]  # step 6: earlier groups train slower
        # Step 7: look again with every group unfrozen. A lower suggestion than the head's lr is
        # taken (the whole network is more fragile than a head on fixed features); a higher one is
        # not. Every batch now runs the whole network: 30 batches at least, enough for a curve.
        if not cfg.lr:
            again = _find_lr(learn, cfg.out / "lr_find_unfrozen.png", log, start_lr=[1e-5 * r for r in ratios],
                             num_it=max(30, learn.steps_per_epoch()))
            lr = min(lr, again)
        lrs = [lr * r for r in ratios]
        log(f"unfrozen lrs: {', '.join(f'{x:.2e}' for x in lrs)}")
        learn.fit(lrs, cfg.unfreeze_cycles, cycle_len=1, cycle_mult=2, cycle_save_name="snapshot")  # step 8
    learn.save(FINAL)
    _write_history(cfg.out / "history.csv", learn)
    plain = learn.predict("valid")
    tta, y = learn.TTA()
    metrics = {
        "accuracy": accuracy(plain, y),
        "log_loss": log_loss(plain, y),
        "accuracy_tta": accuracy(tta, y),
        "log_loss_tta": log_loss(tta, y),
    }
    log("validation: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    recipe = cfg.model_dump(mode="json", exclude={"out", "data", "weights"})
    recipe["epochs"] = len(learn.history)
    export(learn, cfg.out / "bundle", name=cfg.name, metrics=metrics, recipe=recipe)
    write_atomic(cfg.out / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    log(f"bundle: {cfg.out / 'bundle'}")
    return learn, metrics


def load_run_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; pass the folder a `trainer run` wrote (it holds config.json)")
    return RunConfig.model_validate_json(path.read_text())


def learner_from_run(run_dir: Path, log=print) -> ConvLearner:
    """The learner of a finished run, rebuilt from its config.json with its final weights loaded."""
    from trainer.digits import materialise_digits
    from trainer.model import build_net

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    weights = run_dir / "models" / f"{FINAL}.pt"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing; the run did not finish (re-run it, or use --resume)")
    tfms = augment.tfms_from_model(
        cfg.arch, cfg.size, aug_tfms=AUGMENTATIONS[cfg.aug], max_zoom=cfg.max_zoom, crop_pct=cfg.crop_pct
    )
    data = ImageClassifierData.from_paths(
        cfg.data or materialise_digits(run_dir / "digits"), tfms, bs=cfg.bs, val_name=cfg.val_name,
        num_workers=cfg.num_workers, seed=cfg.seed,
    )
    net = build_net(cfg.arch, data.c, pretrained=False)
    learn = ConvLearner(data, net, models_dir=run_dir / "models", log=log)
    learn.load(FINAL)
    learn.snapshots = sorted(
        (p.stem for p in (run_dir / "models").glob("snapshot_cyc_*.pt")), key=lambda n: int(n.rsplit("_", 1)[1])
    )
    return learn


def _find_lr(learn: ConvLearner, png: Path, log, *, num_it: int, start_lr=1e-5) -> float:
    """Run lr_find, save its plot, and return the lesson's pick (one decade below the minimum)."""
    sched = learn.lr_find(start_lr=start_lr, num_it=num_it)
    try:
        suggestion = sched.suggestion()
        sched.plot(png)
    except ValueError as e:  # too few batches for a curve (a tiny dataset): fall back, say so
        log(f"lr_find: {e}; using lr 1e-2")
        return 1e-2
    log(f"lr_find: suggests lr {suggestion.lr:.2e} (steepest descent at {suggestion.lr_steep:.2e}); plot {png}")
    return suggestion.lr


def _write_history(path: Path, learn: ConvLearner) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["epoch", "trn_loss", "val_loss", "accuracy"])
    for s in learn.history:
        writer.writerow([s.epoch, f"{s.trn_loss:.6f}", f"{s.val_loss:.6f}", f"{s.accuracy:.6f}"])
    write_atomic(path, buf.getvalue().encode())


def digits_demo_config(out: Path) -> RunConfig:
    """Small settings that train the digits on a 2-core CPU in about a minute. Digits are never
    flipped (a mirrored 2 is not a 2): rotation, lighting and zoom only."""
    return RunConfig(
        out=out, size=64, crop_pct=1.0, aug="basic", bs=64, head_epochs=3, aug_cycles=1, unfreeze_cycles=0
    )


def served_accuracy(target: str, files: list[Path], labels: list[int], classes: list[str]) -> tuple[float, list]:
    """Accuracy of a running server on image files, and its replies."""
    from serving.client import Client

    replies = []
    with Client(target) as client:
        for f in files:
            replies.append(client.predict_file(f, top_k=1))
    hits = [classes.index(r.predictions[0].label) == y for r, y in zip(replies, labels)]
    return float(np.mean(hits)), replies
