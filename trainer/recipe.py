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
from trainer.learner import ConvLearner
from trainer.metrics import accuracy, log_loss

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
    lr: float = Field(1e-2, gt=0, description="learning rate of the head (the last layer group)")
    lr_ratio: float = Field(10.0, ge=1.0, description="each earlier layer group trains this many times slower")
    head_epochs: int = Field(2, ge=0, description="epochs of the head on precomputed activations")
    aug_cycles: int = Field(2, ge=0, description="cycles (cycle_len=1) of the head with augmentation")
    unfreeze_cycles: int = Field(0, ge=0, description="cycles of all layers, cycle_mult=2")
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
    import torch

    from trainer.digits import materialise_digits
    from trainer.export import export

    torch.manual_seed(cfg.seed)
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
    learn = ConvLearner.pretrained(cfg.arch, data, precompute=cfg.head_epochs > 0, weights=cfg.weights, log=log)
    log("epoch, trn_loss, val_loss, accuracy")
    if cfg.head_epochs:
        learn.fit(cfg.lr, cfg.head_epochs)  # the head on precomputed activations
    if cfg.aug_cycles:
        learn.precompute = False
        learn.fit(cfg.lr, cfg.aug_cycles, cycle_len=1)  # the head with fresh augmentation each epoch
    if cfg.unfreeze_cycles:
        learn.precompute = False
        learn.unfreeze()
        lrs = [cfg.lr / cfg.lr_ratio**2, cfg.lr / cfg.lr_ratio, cfg.lr]
        learn.fit(lrs, cfg.unfreeze_cycles, cycle_len=1, cycle_mult=2)
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
        out=out, size=64, crop_pct=1.0, aug="basic", bs=64, lr=1e-2, head_epochs=3, aug_cycles=1, unfreeze_cycles=0
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
