"""Datasets from folders (one sub-folder per class) or a labels CSV, and the loaders the learner uses.

Over 400 lines: both layouts and every check of them (missing, unreadable and duplicate files,
classes, the validation split) live here, so that a data error is worded once; the dataset and
sampler below them are short."""

from __future__ import annotations

import csv
import dataclasses
import random
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from serving.bundle.preprocess import ImageError, decode_image
from trainer.config import MAX_TRAIN_PIXELS
from trainer.data.augment import Tfms
from trainer.data.resize import resize_images

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


class DataError(ValueError):
    """A dataset that cannot be used; the message names the path and the fix."""


def get_cv_idxs(n: int, val_pct: float = 0.2, seed: int = 42) -> np.ndarray:
    """Indices of a reproducible random validation split: round(n * val_pct) of range(n)."""
    return np.random.default_rng(seed).permutation(n)[: round(n * val_pct)]


def read_image(path: Path, max_pixels: int = MAX_TRAIN_PIXELS) -> Image.Image:
    """Decode one image file, naming the file when it is unreadable."""
    try:
        return decode_image(Path(path).read_bytes(), max_pixels=max_pixels)
    except ImageError as e:
        raise ImageError(f"{path}: {e}") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot read: {e.strerror or e}") from None


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _test_images(path: Path, test_name: str | None) -> list[Path] | None:
    if not test_name:
        return None
    folder = path / test_name
    if not folder.is_dir():
        raise DataError(f"{folder}: no such test folder; pass test_name=None or the folder of unlabelled images")
    return list_images(folder)


class ImageDataset(Dataset):
    """(uint8 CHW tensor, label) pairs; label -1 for an unlabelled (test) set.

    Indexed by i, or by (i, seed) as an EpochSampler yields them. An augmenting transform
    (augment=True: one called as transform(image, rng), like Tfms.train) then draws from
    random.Random(seed), so an image's augmentation never depends on which process reads it."""

    def __init__(
        self,
        files: list[Path],
        labels: list[int] | None,
        transform: Callable[..., np.ndarray],
        *,
        augment: bool = False,
        max_pixels: int = MAX_TRAIN_PIXELS,
    ):
        self.files = list(files)
        self.labels = list(labels) if labels is not None else [-1] * len(self.files)
        self.transform = transform
        self.augment = augment
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        i, seed = item if isinstance(item, tuple) else (item, None)
        im = read_image(self.files[i], self.max_pixels)
        a = self.transform(im, random.Random(seed)) if self.augment and seed is not None else self.transform(im)
        # torch.from_numpy shares memory and needs a writable array (numpy's view of a PIL image is
        # read-only); require() copies only an array that is read-only or not contiguous.
        return torch.from_numpy(np.require(a, requirements=("C", "W"))).permute(2, 0, 1), self.labels[i]


class EpochSampler(Sampler):
    """One pass over a dataset: indices (shuffled or in order), each paired with the seed of its
    augmentation, all drawn from (seed, epoch, repeat) alone. Call set_epoch before iterating, as
    with torch's DistributedSampler.

    Why not save the loader's torch.Generator in the checkpoint instead? That would resume runs with
    num_workers=0 only: each worker process keeps its own random state (across epochs, as workers
    persist), where no checkpoint can reach it. With the randomness a pure function of the epoch
    number, as torchvision's references and timm derive it, epoch n draws the same order and the
    same augmentation whether it follows epoch n-1 in one process, follows a resume, or runs on any
    number of workers, and there is no state to save. The indices come from this sampler in the
    main process even with workers, so set_epoch reaches persistent workers too."""

    def __init__(self, n: int, *, seed: int | None, shuffle: bool, rank: int = 0, world_size: int = 1):
        self.n, self.shuffle = n, shuffle
        # Distributed training: every rank draws the same pass from the same seed and keeps its
        # interleaved share, padded (from the pass's start) so that every rank takes the same number
        # of steps, as torch's DistributedSampler does; rank r's k-th batch and the others' together
        # hold the images one process would put in its k-th batch of world_size times the size.
        self.rank, self.world_size = rank, world_size
        # No seed: one drawn from torch's global generator, as DataLoader(shuffle=True) draws its own.
        self.seed = seed if seed is not None else int(torch.empty((), dtype=torch.int64).random_().item())
        self.epoch, self.repeat = 0, 0

    def set_epoch(self, epoch: int, repeat: int = 0) -> None:
        """Draw epoch `epoch` next; repeat > 0 for further passes at the same epoch (lr_find cycling
        a small training set), so that they are reshuffled too."""
        self.epoch, self.repeat = epoch, repeat

    def __len__(self) -> int:
        return -(-self.n // self.world_size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rng = np.random.default_rng([self.seed % 2**64, self.epoch, self.repeat])
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        pairs = list(zip(order.tolist(), rng.integers(2**63, size=self.n).tolist(), strict=True))
        if self.world_size > 1:
            padded = len(self) * self.world_size
            pairs = (pairs * -(-padded // max(1, self.n)))[:padded][self.rank :: self.world_size]
        return iter(pairs)


def _folder_dataset(root: Path, classes: list[str] | None) -> tuple[list[Path], list[int], list[str]]:
    if not root.is_dir():
        beside = (
            sorted(d.name for d in root.parent.iterdir() if d.is_dir() and not d.name.startswith("."))
            if root.parent.is_dir()
            else []
        )
        there = f"; {root.parent} holds {', '.join(beside)}" if beside else ""
        hint = " (pick the validation folder with --val-name)" if beside and root.name in ("valid", "val") else ""
        raise DataError(f"{root}: no such folder; expected one sub-folder of images per class{there}{hint}")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    classes = classes or found
    if not classes:
        raise DataError(f"{root}: no class folders; put the images of each class in {root}/<class>/")
    files, labels = [], []
    for i, c in enumerate(classes):
        folder = root / c
        images = list_images(folder) if folder.is_dir() else []
        files += images
        labels += [i] * len(images)
    if not files:
        raise DataError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the class folders")
    return files, labels, classes


@dataclass
class ImageClassifierData:
    """Training, validation and optional test sets with the transforms that read them."""

    path: Path
    classes: list[str]
    trn_files: list[Path]
    trn_y: list[int]
    val_files: list[Path]
    val_y: list[int]
    tfms: Tfms
    bs: int = 64
    num_workers: int = 2
    test_files: list[Path] | None = None
    seed: int | None = None
    max_pixels: int = MAX_TRAIN_PIXELS  # the largest image read (trainer.config.MAX_TRAIN_PIXELS)
    # Loaders are kept so that worker processes persist across epochs instead of restarting.
    _loaders: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_paths(
        cls,
        path: Path | str,
        tfms: Tfms,
        bs: int = 64,
        trn_name: str = "train",
        val_name: str = "valid",
        test_name: str | None = None,
        num_workers: int = 2,
        seed: int | None = None,
    ) -> ImageClassifierData:
        """`path/trn_name/<class>/*.jpg` and `path/val_name/<class>/*.jpg` (the lesson's layout)."""
        path = Path(path)
        trn_files, trn_y, classes = _folder_dataset(path / trn_name, None)
        if len(classes) < 2:
            raise DataError(f"{path / trn_name}: only one class ({classes[0]}); a classifier needs at least two")
        val_files, val_y, _ = _folder_dataset(path / val_name, classes)
        test_files = _test_images(path, test_name)
        return cls(path, classes, trn_files, trn_y, val_files, val_y, tfms, bs, num_workers, test_files, seed)

    @classmethod
    def from_csv(
        cls,
        path: Path | str,
        folder: str,
        csv_fname: Path | str,
        tfms: Tfms,
        val_idxs=None,
        suffix: str = "",
        test_name: str | None = None,
        bs: int = 64,
        num_workers: int = 2,
        skip_missing: bool = False,
        seed: int | None = None,
        id_col: str | None = None,
        label_col: str | None = None,
    ) -> ImageClassifierData:
        """Images in one folder, labelled by a CSV with a header row (Kaggle's `labels.csv`).

        Row i names the image `path/folder/<id><suffix>` and its single label. `id_col` and
        `label_col` pick columns by header name; by default the first two columns are used.
        `csv_fname` is looked up under `path`, then as given (the lesson passes f"{PATH}labels.csv").
        `val_idxs` are row indices into the CSV as listed (default `get_cv_idxs(n)`: a fixed 20%), so
        the split does not depend on which images are present; `seed` seeds the loaders, as in
        `from_paths`. Classes are the sorted unique labels of all rows.

        A row whose image is missing is a DataError unless `skip_missing=True`, which drops the row
        with a warning. Every other problem (no such CSV, no header, a missing named column, an empty
        id or label, a repeated id, fewer than two classes, an empty split) is a DataError too.
        """
        path = Path(path)
        csv_path = find_csv(path, Path(csv_fname))
        rows = _read_labels_csv(csv_path, id_col, label_col)
        image_dir = path / folder
        if not image_dir.is_dir():
            raise DataError(f"{image_dir}: no such folder; `folder` names the folder of images under {path}")
        classes = sorted({label for _, label in rows})
        if len(classes) < 2:
            raise DataError(
                f"{csv_path}: only {len(classes)} class ({', '.join(classes)}); a classifier needs at least two"
            )

        n = len(rows)
        val = np.asarray(get_cv_idxs(n) if val_idxs is None else val_idxs).ravel()
        if val.size == 0:
            val = val.astype(np.int64)
        elif not np.issubdtype(val.dtype, np.integer) or val.min() < 0 or val.max() >= n:
            raise DataError(
                f"val_idxs must be integer row indices in [0, {n}) of {csv_path}; got {val.dtype} values {val.min()}..{val.max()}"
            )
        is_val = np.zeros(n, dtype=bool)
        is_val[val] = True

        files = [image_dir / f"{image_id}{suffix}" for image_id, _ in rows]
        present = [f.is_file() for f in files]
        missing = [f for f, ok in zip(files, present, strict=True) if not ok]
        if missing:
            first = ", ".join(str(f) for f in missing[:5]) + (
                f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            )
            if not skip_missing:
                raise DataError(
                    f"{csv_path}: {len(missing)} of {n} rows name an image that does not exist: {first}. "
                    f"Images are looked up as {image_dir}/<id>{suffix} (suffix={suffix!r}); fix --folder or "
                    "--suffix, or pass --skip-missing to drop those rows (from Python: skip_missing=True)"
                )
            warnings.warn(
                f"{csv_path}: skipped {len(missing)} of {n} rows whose image is missing: {first}", stacklevel=2
            )

        index = {c: i for i, c in enumerate(classes)}
        split: dict[bool, tuple[list[Path], list[int]]] = {False: ([], []), True: ([], [])}
        for f, (_, label), ok, v in zip(files, rows, present, is_val, strict=True):
            if ok:
                split[bool(v)][0].append(f)
                split[bool(v)][1].append(index[label])
        (trn_files, trn_y), (val_files, val_y) = split[False], split[True]
        for name, got in (("training", trn_files), ("validation", val_files)):
            if not got:
                raise DataError(
                    f"{csv_path}: the {name} set is empty ({n} rows, {int(is_val.sum())} in val_idxs, "
                    f"{len(missing)} missing); pass val_idxs that leave images on both sides"
                )
        test_files = _test_images(path, test_name)
        return cls(path, classes, trn_files, trn_y, val_files, val_y, tfms, bs, num_workers, test_files, seed)

    @property
    def c(self) -> int:
        return len(self.classes)

    def resize(self, target: int, new_path: str = "tmp", *, workers: int | None = None) -> ImageClassifierData:
        """The lesson's `data.resize(340, 'tmp')`: the same dataset read from cached copies of its
        images with the shorter side at most `target` pixels (`trainer.data.resize.resize_images`).

        The copies go to `trainer.data.resize.cache_dir(self.path, target, new_path)`: `new_path/<target>`
        beside the data, or in the user's cache when the data folder is read-only. Labels, classes,
        transforms and `path` are unchanged, so models and other caches stay where they were."""
        copies = resize_images(
            [*self.trn_files, *self.val_files, *(self.test_files or [])],
            self.path,
            target,
            tmp_name=new_path,
            interpolation=self.tfms.prep.interpolation,
            workers=workers,
            max_pixels=self.max_pixels,
        )
        return dataclasses.replace(
            self,
            trn_files=[copies[f] for f in self.trn_files],
            val_files=[copies[f] for f in self.val_files],
            test_files=None if self.test_files is None else [copies[f] for f in self.test_files],
        )

    def resized(self, target: int) -> ImageClassifierData:
        """`resize(target)` for training at this data's size (`trainer run --resize`): refuses a
        target below the input size, which would train on upscaled copies.

        Evaluation and TTA then read the copies too, while the exported bundle serves the original
        images, so validation probabilities can differ slightly from what the server answers."""
        if target < self.tfms.sz:
            raise DataError(
                f"resize target {target} px is smaller than the training size {self.tfms.sz} px; "
                f"pass a target of at least {self.tfms.sz} (the lesson resizes to 340 for 224)"
            )
        return self.resize(target)

    def with_tfms(self, tfms: Tfms) -> ImageClassifierData:
        """The same files read with other transforms (progressive resizing: 128 px, then 224 px)."""
        return dataclasses.replace(self, tfms=tfms)

    def dataset(self, name: str, *, augment: bool = False) -> ImageDataset:
        files, labels = {
            "train": (self.trn_files, self.trn_y),
            "valid": (self.val_files, self.val_y),
            "test": (self.test_files or [], None),
        }[name]
        transform = self.tfms.train if augment else self.tfms.eval
        return ImageDataset(files, labels, transform, augment=augment, max_pixels=self.max_pixels)

    def loader(
        self,
        name: str,
        *,
        augment: bool = False,
        shuffle: bool = False,
        once: bool = False,
        shard: tuple[int, int] = (0, 1),
    ) -> DataLoader:
        """A loader of uint8 CHW batches; the same object on every call with the same arguments
        (unless once=True).

        With augment or shuffle its sampler is an EpochSampler: call `loader.sampler.set_epoch(n)`
        before each epoch (ConvLearner.batches does), or every pass repeats epoch 0.

        shard=(rank, world_size): that rank's share of the set in distributed training, interleaved
        (trainer.learn.distributed); for a training pass, padded so that every rank takes as many steps.

        once=True: a new loader for one pass (precompute reads each set once), whose workers exit
        when the pass ends. A kept loader's workers persist until the data is dropped: kept, the
        plain training set's sat idle through every later stage of a run, two processes of the
        seven a default run had (bench/training.py's memory section)."""
        if once:
            return self._new_loader(name, augment, shuffle, shard, persistent=False)
        key = (name, augment, shuffle, self.bs, shard)
        if key not in self._loaders:
            self._loaders[key] = self._new_loader(name, augment, shuffle, shard, persistent=self.num_workers > 0)
        return self._loaders[key]

    def _new_loader(
        self, name: str, augment: bool, shuffle: bool, shard: tuple[int, int], *, persistent: bool
    ) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if self.seed is not None else None
        dataset = self.dataset(name, augment=augment)
        rank, world = shard
        sampler: Iterable | None = None
        if augment or shuffle:
            sampler = EpochSampler(len(dataset), seed=self.seed, shuffle=shuffle, rank=rank, world_size=world)
        elif world > 1:
            sampler = range(rank, len(dataset), world)  # evaluation: no padding, gathered back in order
        return DataLoader(
            dataset,
            batch_size=self.bs,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=persistent,
            generator=generator,
            worker_init_fn=_seed_worker,
        )


def find_csv(path: Path, csv_fname: Path) -> Path:
    """The labels CSV `csv_fname` names: under `path`, else as given (from_csv's rule)."""
    candidates = [csv_fname] if csv_fname.is_absolute() else [path / csv_fname, csv_fname]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = " or ".join(str(c) for c in dict.fromkeys(candidates))
    raise DataError(f"{tried}: no such CSV file; pass csv_fname relative to path, or a full path")


def _column(csv_path: Path, header: list[str], name: str | None, default: int, role: str) -> int:
    if name is None:
        return default
    if name not in header:
        raise DataError(
            f"{csv_path}: no column named {name!r} for the {role}; the columns are {', '.join(map(repr, header))}"
        )
    return header.index(name)


def _read_labels_csv(csv_path: Path, id_col: str | None, label_col: str | None) -> list[tuple[str, str]]:
    """(id, label) of every data row, in file order; blank lines are ignored."""
    # utf-8-sig: spreadsheet exports often start with a byte-order mark that would stick to the first name.
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        lines = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    if not lines:
        raise DataError(f"{csv_path}: empty; expected a header row such as `id,label` and one row per image")
    header = [h.strip() for h in lines[0]]
    if len(header) < 2 and (id_col is None or label_col is None):
        raise DataError(
            f"{csv_path}: the header has {len(header)} column ({', '.join(map(repr, header))}); "
            "expected an id column and a label column, such as `id,label`"
        )
    i = _column(csv_path, header, id_col, 0, "image id")
    j = _column(csv_path, header, label_col, 1, "label")
    rows: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for line_no, row in enumerate(lines[1:], start=2):
        if len(row) <= max(i, j) or not row[i].strip() or not row[j].strip():
            raise DataError(
                f"{csv_path}: row {line_no} has no {header[i]!r} or no {header[j]!r} value ({row}); "
                "every row needs an image id and a label"
            )
        image_id, label = row[i].strip(), row[j].strip()
        if image_id in seen:
            # The same image twice could land on both sides of the split and inflate validation scores.
            raise DataError(
                f"{csv_path}: id {image_id!r} is on rows {seen[image_id]} and {line_no}; ids must be unique"
            )
        seen[image_id] = line_no
        rows.append((image_id, label))
    if not rows:
        raise DataError(f"{csv_path}: a header but no rows; add one row per image")
    return rows


def _seed_worker(worker_id: int) -> None:
    # Reproducible randomness per worker for transforms that use the global generators; the
    # augmentation of training batches does not (it draws from the seeds of an EpochSampler).
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
