"""From a run's configuration to its data: a folder dataset, a labels CSV or the embedded digits."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Any

from trainer.config import RunConfig
from trainer.data import augment
from trainer.data.digits import materialise_digits
from trainer.data.loaders import DataError, ImageClassifierData
from trainer.learn import distributed
from trainer.learn.distributed import Dist

AUGMENTATIONS = {
    "side_on": augment.transforms_side_on,
    "top_down": augment.transforms_top_down,
    "basic": augment.transforms_basic,
    "none": [],
}


def make_data(cfg: RunConfig, size: int, run_dir: Path, dist: Dist | None = None) -> ImageClassifierData:
    """The run's data at `size` pixels, less the files it leaves out (cfg.skipped from every split,
    cfg.exclude from training). With cfg.full the training set includes the validation images (see
    train_on_validation_too). In distributed training each machine's first rank reads (and caches)
    it before the others."""
    with distributed.local_main_first(dist or Dist()):
        data = leave_out(list_data(cfg, size, run_dir), cfg, data_root(cfg, run_dir))
        if cfg.resize is not None:  # train (and validate) from the cache of smaller copies
            data = data.resized(cfg.resize)
        return train_on_validation_too(data) if cfg.full else data


def data_root(cfg: RunConfig, run_dir: Path) -> Path:
    """The folder the dataset's paths are relative to: --data, or the embedded digits' folder."""
    return Path(cfg.data) if cfg.data is not None else Path(run_dir) / "digits"


def relative(f: Path, root: Path) -> str:
    """A dataset file's path relative to its root, with / between folders (as config.json,
    label_errors.csv and --exclude name files); the path as given when it lies outside. Lexically
    first, then resolved: an absolute path in an --exclude list matches a relative --data."""
    for a, b in ((Path(f), Path(root)), (Path(f).resolve(), Path(root).resolve())):
        try:
            return a.relative_to(b).as_posix()
        except ValueError:
            pass
    return Path(f).as_posix()


def list_data(cfg: RunConfig, size: int, run_dir: Path) -> ImageClassifierData:
    """Every image the configuration names, at `size` pixels, before anything is left out."""
    tfms = augment.tfms_from_model(
        cfg.arch, size, aug_tfms=AUGMENTATIONS[cfg.aug], max_zoom=cfg.max_zoom, crop_pct=cfg.crop_pct
    )
    common: dict[str, Any] = {"bs": cfg.bs, "num_workers": cfg.num_workers, "seed": cfg.seed}
    if cfg.data is None:
        data = ImageClassifierData.from_paths(materialise_digits(data_root(cfg, run_dir)), tfms, **common)
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
            **common,
        )
    else:
        data = ImageClassifierData.from_paths(cfg.data, tfms, val_name=cfg.val_name, **common)
    return dataclasses.replace(data, max_pixels=cfg.max_pixels)


def leave_out(data: ImageClassifierData, cfg: RunConfig, root: Path) -> ImageClassifierData:
    """`data` without cfg.skipped (unreadable: every split) and cfg.exclude's files (training only:
    validation keeps its images, so that scores compare with a run without the list)."""
    skipped, excluded = set(cfg.skipped), read_exclude(cfg.exclude, root) if cfg.exclude else set()
    if not skipped and not excluded:
        return data
    trn = [
        (f, y) for f, y in zip(data.trn_files, data.trn_y, strict=True) if relative(f, root) not in skipped | excluded
    ]
    val = [(f, y) for f, y in zip(data.val_files, data.val_y, strict=True) if relative(f, root) not in skipped]
    for name, kept, before in (("training", trn, data.trn_files), ("validation", val, data.val_files)):
        if not kept:
            raise DataError(
                f"{root}: every one of the {len(before)} {name} images is left out (unreadable, or in --exclude); "
                "nothing is left to train or validate on"
            )
    (trn_files, trn_y), (val_files, val_y) = zip(*trn, strict=True), zip(*val, strict=True)
    return dataclasses.replace(
        data, trn_files=list(trn_files), trn_y=list(trn_y), val_files=list(val_files), val_y=list(val_y)
    )


def read_exclude(path: Path, root: Path) -> set[str]:
    """The files an --exclude list names, relative to `root`: the `file` column of a CSV with a
    header (label_errors.csv), else one path per line; absolute paths under `root` are made relative."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as e:
        raise DataError(f"{path}: cannot read the --exclude list: {e.strerror or e}") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and "file" in next(csv.reader([lines[0]])):
        lines = [row.get("file") or "" for row in csv.DictReader(lines)]
    names = [Path(n.strip()) for n in lines if n.strip()]
    return {relative(n, root) if n.is_absolute() else n.as_posix() for n in names}


def train_on_validation_too(data: ImageClassifierData) -> ImageClassifierData:
    """--full: the final model also learns from the validation images, whose scores are then not
    held out (the run folder, report and bundle say so)."""
    return dataclasses.replace(data, trn_files=data.trn_files + data.val_files, trn_y=data.trn_y + data.val_y)
