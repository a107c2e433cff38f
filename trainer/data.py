"""Datasets from folders (one sub-folder per class) and the loaders the learner uses."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from serving.preprocess import ImageError, decode_image
from trainer.augment import Tfms

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


class DataError(ValueError):
    """A dataset that cannot be used; the message names the path and the fix."""


def get_cv_idxs(n: int, val_pct: float = 0.2, seed: int = 42) -> np.ndarray:
    """Indices of a reproducible random validation split: round(n * val_pct) of range(n)."""
    return np.random.default_rng(seed).permutation(n)[: round(n * val_pct)]


def read_image(path: Path):
    """Decode one image file, naming the file when it is unreadable."""
    try:
        return decode_image(Path(path).read_bytes())
    except ImageError as e:
        raise ImageError(f"{path}: {e}") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot read: {e.strerror or e}") from None


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class ImageDataset(Dataset):
    """(uint8 CHW tensor, label) pairs; label -1 for an unlabelled (test) set."""

    def __init__(self, files: list[Path], labels: list[int] | None, transform: Callable[..., np.ndarray]):
        self.files = list(files)
        self.labels = list(labels) if labels is not None else [-1] * len(self.files)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        a = self.transform(read_image(self.files[i]))
        return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1), self.labels[i]


def _folder_dataset(root: Path, classes: list[str] | None) -> tuple[list[Path], list[int], list[str]]:
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; expected one sub-folder of images per class")
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
        test_files = list_images(path / test_name) if test_name else None
        return cls(path, classes, trn_files, trn_y, val_files, val_y, tfms, bs, num_workers, test_files, seed)

    @property
    def c(self) -> int:
        return len(self.classes)

    def with_tfms(self, tfms: Tfms) -> ImageClassifierData:
        """The same files read with other transforms (progressive resizing: 128 px, then 224 px)."""
        return ImageClassifierData(**{**self.__dict__, "tfms": tfms})

    def dataset(self, name: str, *, augment: bool = False) -> ImageDataset:
        files, labels = {
            "train": (self.trn_files, self.trn_y),
            "valid": (self.val_files, self.val_y),
            "test": (self.test_files or [], None),
        }[name]
        return ImageDataset(files, labels, self.tfms.train if augment else self.tfms.eval)

    def loader(self, name: str, *, augment: bool = False, shuffle: bool = False) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if self.seed is not None else None
        return DataLoader(
            self.dataset(name, augment=augment),
            batch_size=self.bs,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
            generator=generator,
            worker_init_fn=_seed_worker,
        )


def _seed_worker(worker_id: int) -> None:
    # Fresh, reproducible randomness per worker and epoch (torch seeds each worker differently).
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
