"""From a run's configuration to its data: a folder dataset, a labels CSV or the embedded digits."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from trainer.config import RunConfig
from trainer.data import augment
from trainer.data.digits import materialise_digits
from trainer.data.loaders import ImageClassifierData
from trainer.learn import distributed
from trainer.learn.distributed import Dist

AUGMENTATIONS = {
    "side_on": augment.transforms_side_on,
    "top_down": augment.transforms_top_down,
    "basic": augment.transforms_basic,
    "none": [],
}


def make_data(cfg: RunConfig, size: int, run_dir: Path, dist: Dist | None = None) -> ImageClassifierData:
    """The run's data at `size` pixels. With cfg.full the training set includes the validation
    images (see train_on_validation_too). In distributed training each machine's first rank reads
    (and caches) it before the others."""
    with distributed.local_main_first(dist or Dist()):
        return _make_data(cfg, size, run_dir)


def _make_data(cfg: RunConfig, size: int, run_dir: Path) -> ImageClassifierData:
    tfms = augment.tfms_from_model(
        cfg.arch, size, aug_tfms=AUGMENTATIONS[cfg.aug], max_zoom=cfg.max_zoom, crop_pct=cfg.crop_pct
    )
    if cfg.data is None:
        data = ImageClassifierData.from_paths(
            materialise_digits(Path(run_dir) / "digits"), tfms, bs=cfg.bs, num_workers=cfg.num_workers, seed=cfg.seed
        )
    elif cfg.csv:
        data = ImageClassifierData.from_csv(
            cfg.data,
            cfg.folder,
            cfg.csv,
            tfms,
            suffix=cfg.suffix,
            id_col=cfg.id_col,
            label_col=cfg.label_col,
            skip_missing=cfg.skip_missing,
            bs=cfg.bs,
            num_workers=cfg.num_workers,
            seed=cfg.seed,
        )
    else:
        data = ImageClassifierData.from_paths(
            cfg.data, tfms, val_name=cfg.val_name, bs=cfg.bs, num_workers=cfg.num_workers, seed=cfg.seed
        )
    if cfg.resize is not None:  # train (and validate) from the cache of smaller copies
        data = data.resized(cfg.resize)
    return train_on_validation_too(data) if cfg.full else data


def train_on_validation_too(data: ImageClassifierData) -> ImageClassifierData:
    """--full: the final model also learns from the validation images, whose scores are then not
    held out (the run folder, report and bundle say so)."""
    return dataclasses.replace(data, trn_files=data.trn_files + data.val_files, trn_y=data.trn_y + data.val_y)
