"""Likely label errors (`trainer clean`): confident learning on out-of-fold predictions.

A linear head (multinomial logistic regression) on the backbone's pooled ImageNet activations, the
ones precompute caches, predicts every labelled image from a model that never saw it (k-fold
cross-validation), so no training run is needed and no image vouches for its own label. Confident
learning (Northcutt, Jiang & Chuang, "Confident Learning: Estimating Uncertainty in Dataset Labels",
JAIR 2021) then flags the images whose given label those predictions confidently contradict, ranked
by self-confidence, the probability of the given label, lowest first: cleanlab's default ranking.

Written here rather than taken from cleanlab, which is AGPL-3.0: this Apache-2.0 product cannot
take it. What is written is the paper's confident joint and its off-diagonal, not cleanlab's other
filters (prune by noise rate, by class)."""

from __future__ import annotations

import codecs
import csv
import io
import shlex
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from serving.bundle.files import write_atomic
from trainer.config import Log, RunConfig
from trainer.data.assemble import data_root, make_data, relative
from trainer.data.loaders import DataError, find_csv
from trainer.outputs import plots
from trainer.outputs.run_folder import RunFolder

# Inverse L2 strength of the logistic regression on standardised activations (2,560 for
# EfficientNet-Lite0's average and max pooling). A few hundred images in that many dimensions are
# linearly separable, so a weakly regularised model fits the wrong labels of its training folds too;
# as C falls it tends to the direction between the class means, which a few wrong labels barely move.
# Measured on hymenoptera (398 photos, 224 px, EfficientNet-Lite0, 10% of labels flipped at random,
# three draws): C=1 flagged 85-90% of the flipped images at a precision of 0.61-0.67, C=0.01 79-85% at
# 0.77-0.82, C=0.001 74-87% at 0.94-0.97, C=0.0003 77% at 0.97-1.0. Suspects are reviewed by a person,
# so precision counts: 0.001.
C = 0.001
# cleanlab's tolerance on p >= t_k: a class whose images all get the same probability must pass its
# own threshold, which float rounding of the mean can put a hair above it.
THRESHOLD_TOLERANCE = 1e-6

LABEL_ERRORS_CSV = "label_errors.csv"
LABEL_ERRORS_PNG = "label_errors.png"
CSV_COLUMNS = ("rank", "file", "split", "given", "predicted", "p_given", "p_predicted")
FIXES = ("relabel", "drop")  # what --write-labels does to a flagged row
LOGGED_SUSPECTS = 5  # suspects printed one line each; the CSV has them all
GRID_THUMB = 220  # pixels, the longer side of each suspect's picture in label_errors.png


# --- out-of-fold probabilities -------------------------------------------------------------------


def usable_folds(y: np.ndarray, folds: int) -> int:
    """The folds the smallest class allows: each class of 2+ images should have one in every fold's
    held-out part, so at most the smallest such class's count, and at least 2. A class of one image
    does not count: no number of folds lets a model both see it and predict it."""
    counts = np.bincount(np.asarray(y, dtype=np.int64))
    several = counts[counts >= 2]
    if not len(several):
        raise ValueError(f"every class has at most one image ({len(y)} images): no class can be learnt from others")
    return max(2, min(folds, int(several.min())))


def out_of_fold_probs(
    features: np.ndarray,
    y: np.ndarray,
    *,
    folds: int = 5,
    seed: int = 42,
    n_classes: int | None = None,
    log: Log | None = None,
) -> np.ndarray:
    """Probabilities (n, n_classes), each row from a model that did not train on that image: a
    standardised multinomial logistic regression in stratified, shuffled k-fold cross-validation.

    `y` holds class indices; columns are all of range(n_classes) (default max(y) + 1) whatever a
    fold's model saw: a class missing from a fold's training part (a class of one image) gets
    probability 0 there. Fewer folds than asked when the smallest class has fewer images
    (usable_folds), said to `log`."""
    x, y = np.asarray(features, dtype=np.float64), np.asarray(y, dtype=np.int64)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"need one row of features per label, got features {x.shape} and {y.shape} labels")
    k = usable_folds(y, folds)
    n_classes = int(y.max()) + 1 if n_classes is None else n_classes
    if k < folds and log is not None:
        log(f"{k} folds instead of {folds}: the smallest class of 2+ images has {k} images")
    probs = np.zeros((len(y), n_classes))
    with warnings.catch_warnings():  # a class of one image is expected, and handled in _fit_predict
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        splits = list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(x, y))
    for train, held_out in splits:
        probs[held_out] = _fit_predict(x[train], y[train], x[held_out], n_classes)
    return probs


def _fit_predict(x: np.ndarray, y: np.ndarray, x_new: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities of `x_new` in all n_classes columns from a model fitted on (x, y)."""
    out = np.zeros((len(x_new), n_classes))
    seen = np.unique(y)
    if len(seen) == 1:  # two classes, one of a single image held out: only the other was seen
        out[:, seen[0]] = 1.0
        return out
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000))
    model.fit(x, y)
    out[:, model[-1].classes_] = model.predict_proba(x_new)
    return out


# --- confident learning --------------------------------------------------------------------------


@dataclass(frozen=True)
class Suspect:
    """An image whose given label confident learning doubts: its row in the probabilities, its given
    and predicted (confident) class, and their probabilities."""

    index: int
    given: int
    predicted: int
    p_given: float
    p_predicted: float


def _checked(probs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs, y = np.asarray(probs, dtype=np.float64), np.asarray(y, dtype=np.int64)
    if probs.ndim != 2 or len(probs) != len(y) or (len(y) and (y.min() < 0 or y.max() >= probs.shape[1])):
        raise ValueError(f"need probs (n, classes) and n labels in range(classes), got {probs.shape} and {y.shape}")
    return probs, y


def confident_thresholds(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """t_k, the mean probability of class k over the images labelled k: how sure the model usually
    is of a k. Infinite (nothing is confidently k) for a class of fewer than two images: with one,
    its out-of-fold probability came from a model that never saw the class."""
    probs, y = _checked(probs, y)
    n_classes = probs.shape[1]
    counts = np.bincount(y, minlength=n_classes)
    sums = np.bincount(y, weights=probs[np.arange(len(y)), y], minlength=n_classes)
    return np.where(counts >= 2, sums / np.maximum(counts, 1), np.inf)


def confident_labels(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Per image, the class it confidently belongs to: the most probable of the classes k with
    p_k >= t_k; -1 when no class reaches its threshold (the image is not counted in the confident
    joint)."""
    probs = np.asarray(probs, dtype=np.float64)
    above = probs >= np.asarray(thresholds) - THRESHOLD_TOLERANCE
    best = np.where(above, probs, -np.inf).argmax(axis=1)
    return np.where(above.any(axis=1), best, -1)


def find_label_errors(probs: np.ndarray, y: np.ndarray) -> list[Suspect]:
    """The images off the confident joint's diagonal (labelled j, confidently k != j), lowest
    probability of the given label first (ties in index order).

    One guard beyond the paper's definition, as cleanlab's pruning filters have it: an image whose
    most probable class is its given one is not flagged, though another class passed its threshold
    and its own did not."""
    probs, y = _checked(probs, y)
    confident = confident_labels(probs, confident_thresholds(probs, y))
    rows = np.arange(len(y))
    flagged = np.flatnonzero((confident >= 0) & (confident != y) & (probs.argmax(axis=1) != y))
    p_given = probs[rows, y]
    ranked = flagged[np.argsort(p_given[flagged], kind="stable")]
    return [
        Suspect(int(i), int(y[i]), int(confident[i]), float(p_given[i]), float(probs[i, confident[i]])) for i in ranked
    ]


# --- a run's dataset -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelledImages:
    """Every labelled image of a run's dataset, training then validation, with its activations."""

    root: Path  # the dataset folder: --data, or the embedded digits' folder
    files: list[Path]  # the originals (with --resize the activations are of their cached copies)
    splits: list[str]
    y: np.ndarray
    features: np.ndarray
    classes: list[str]

    def name(self, i: int) -> str:
        """Image i's path relative to the dataset folder, as --exclude reads it."""
        return relative(self.files[i], self.root)


def labelled_images(folder: RunFolder, cfg: RunConfig, log: Log) -> LabelledImages:
    """The pretrained backbone's pooled activations of every labelled image, at the first training
    size (the precompute cache of a run with the same settings is reused)."""
    size = cfg.train_sizes[0]
    learn = folder.new_learner(cfg, size, precompute=True, log=log)
    data = learn.data
    originals = make_data(cfg.model_copy(update={"resize": None}), size, folder.path) if cfg.resize else data
    return LabelledImages(
        root=data_root(cfg, folder.path),
        files=[*originals.trn_files, *originals.val_files],
        splits=["train"] * len(data.trn_files) + ["valid"] * len(data.val_files),
        y=np.asarray([*data.trn_y, *data.val_y], dtype=np.int64),
        features=np.concatenate([learn.features("train").numpy(), learn.features("valid").numpy()]),
        classes=list(data.classes),
    )


def suspects_csv(images: LabelledImages, suspects: Sequence[Suspect]) -> str:
    """label_errors.csv's text: one row per suspect, in rank order, `file` relative to the dataset folder."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for rank, s in enumerate(suspects, start=1):
        given, predicted = images.classes[s.given], images.classes[s.predicted]
        split = images.splits[s.index]
        writer.writerow(
            [rank, images.name(s.index), split, given, predicted, f"{s.p_given:.4f}", f"{s.p_predicted:.4f}"]
        )
    return buf.getvalue()


def labels_csv_of(cfg: RunConfig, write_labels: Path) -> Path:
    """The run's labels CSV, which --write-labels copies; a DataError for a dataset without one, or
    when the copy would replace it."""
    if cfg.data is None or not cfg.csv:
        what = (
            "the embedded digits"
            if cfg.data is None
            else f"{cfg.data} is a folder dataset (one folder per class), which"
        )
        raise DataError(
            f"--write-labels: {what} has no labels CSV to copy. Review label_errors.csv and move the images "
            "you agree with to their class's folder, or train without them with `trainer run --exclude "
            "RUN/label_errors.csv`"
        )
    original = find_csv(Path(cfg.data), Path(cfg.csv))
    if Path(write_labels).resolve() == original.resolve():
        raise DataError(
            f"--write-labels {write_labels}: that is the labels CSV itself; write the copy to another file "
            "and review it before it replaces the original"
        )
    return original


def fixed_labels(text: str, cfg: RunConfig, images: LabelledImages, suspects: Sequence[Suspect], fix: str) -> str:
    """The labels CSV `text` with each suspect's row relabelled with its predicted class
    (fix="relabel") or left out (fix="drop"); every other row, the header and all columns as they were.
    Rows are matched to images as the dataset names them: <data>/<folder>/<id><suffix>."""
    _check_fix(fix)
    rows = list(csv.reader(io.StringIO(text)))
    start = next(i for i, row in enumerate(rows) if any(cell.strip() for cell in row))  # the header
    header = [h.strip() for h in rows[start]]
    id_col = header.index(cfg.id_col) if cfg.id_col else 0
    label_col = header.index(cfg.label_col) if cfg.label_col else 1
    by_file = {images.files[s.index]: s for s in suspects}
    image_dir = images.root / cfg.folder
    out = rows[: start + 1]
    for row in rows[start + 1 :]:
        s = by_file.get(image_dir / f"{row[id_col].strip()}{cfg.suffix}") if len(row) > id_col else None
        if s is None:
            out.append(row)
        elif fix == "relabel":
            out.append([images.classes[s.predicted] if c == label_col else v for c, v in enumerate(row)])
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n" if "\r\n" in text else "\n").writerows(out)
    return buf.getvalue()


def _check_fix(fix: str) -> None:
    if fix not in FIXES:
        raise ValueError(f"--fix must be one of {', '.join(FIXES)}, got {fix!r}")


def _write_fixed_labels(
    original: Path, out: Path, cfg: RunConfig, images: LabelledImages, suspects: Sequence[Suspect], fix: str
) -> None:
    raw = original.read_bytes()
    bom = codecs.BOM_UTF8 if raw.startswith(codecs.BOM_UTF8) else b""  # a spreadsheet's, kept as it was
    text = fixed_labels(raw[len(bom) :].decode("utf-8"), cfg, images, suspects, fix)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, bom + text.encode("utf-8"))


def _write_figure(folder: RunFolder, images: LabelledImages, suspects: Sequence[Suspect], top: int, log: Log) -> None:
    png = folder.figure(LABEL_ERRORS_PNG)
    shown = suspects[:top]
    if not shown:
        png.unlink(missing_ok=True)  # an earlier clean's figure would show other suspects
        log(f"no {LABEL_ERRORS_PNG}: {'--top is 0' if suspects else 'nothing flagged'}")
        return
    titles = [
        f"{images.files[s.index].name}\ngiven: {images.classes[s.given]} ({s.p_given:.2f})\n"
        f"model: {images.classes[s.predicted]} ({s.p_predicted:.2f})"
        for s in shown
    ]
    # Cells wide enough for a class name of ~35 characters at 8 pt (the default's 160 px cut them).
    plots.plot_image_grid([images.files[s.index] for s in shown], titles, png, thumb=GRID_THUMB)
    log(f"top {len(shown)} suspects: {png}")


def _log_summary(images: LabelledImages, probs: np.ndarray, suspects: Sequence[Suspect], log: Log) -> None:
    accuracy = float((probs.argmax(axis=1) == images.y).mean())
    per_split = {split: images.splits.count(split) for split in ("train", "valid")}
    flagged = {split: sum(images.splits[s.index] == split for s in suspects) for split in per_split}
    log(
        f"ranked {len(images.y)} labelled images ({per_split['train']} train, {per_split['valid']} valid); "
        f"out-of-fold accuracy of the head: {accuracy:.1%}"
    )
    log(
        f"flagged {len(suspects)} likely label errors ({flagged['train']} train, {flagged['valid']} valid)"
        + (", lowest probability of the given label first:" if suspects else "")
    )
    for rank, s in enumerate(suspects[:LOGGED_SUSPECTS], start=1):
        log(
            f"  {rank}. {images.name(s.index)} ({images.splits[s.index]}): given {images.classes[s.given]} "
            f"(p {s.p_given:.2f}), predicted {images.classes[s.predicted]} (p {s.p_predicted:.2f})"
        )


def clean(
    run: Path,
    folds: int = 5,
    top: int = 20,
    write_labels: Path | None = None,
    fix: str = "relabel",
    log: Log = print,
) -> Path:
    """Rank every labelled image of a run's dataset (training and validation) by how likely its label
    is wrong; write RUN/label_errors.csv (the flagged images), RUN/label_errors.png (the first `top`)
    and, with `write_labels`, a copy of the labels CSV with the flagged rows fixed as `fix` says.
    Needs only the run's config.json. Returns the CSV's path."""
    _check_fix(fix)
    folder = RunFolder(run)
    # Validation images once (--full would add them to training too), and every labelled image: an
    # image the run's --exclude left out stays flagged until its label changes.
    cfg = folder.read_config().model_copy(update={"full": False, "exclude": None})
    original = labels_csv_of(cfg, Path(write_labels)) if write_labels is not None else None
    images = labelled_images(folder, cfg, log)
    unseen = [images.classes[k] for k in np.flatnonzero(np.bincount(images.y, minlength=len(images.classes)) == 1)]
    if unseen:
        log(
            f"one image only in {', '.join(unseen)}: no model predicting it saw its class, so its given label "
            "gets probability 0 and, when flagged, it ranks first; a class of one image is often a typo"
        )
    log(f"out-of-fold predictions: logistic regression on {images.features.shape[1]} activations per image")
    probs = out_of_fold_probs(
        images.features, images.y, folds=folds, seed=cfg.seed, n_classes=len(images.classes), log=log
    )
    suspects = find_label_errors(probs, images.y)
    _log_summary(images, probs, suspects, log)
    csv_path = folder.path / LABEL_ERRORS_CSV
    write_atomic(csv_path, suspects_csv(images, suspects).encode())
    log(
        f"label errors: {csv_path} (to train without them, add --exclude {shlex.quote(str(csv_path))} to the run's flags)"
    )
    _write_figure(folder, images, suspects, top, log)
    if original is not None and write_labels is not None:
        _write_fixed_labels(original, Path(write_labels), cfg, images, suspects, fix)
        done = "relabelled with the predicted class" if fix == "relabel" else "dropped"
        log(f"labels with {len(suspects)} rows {done}: {write_labels} (review it before training on it)")
    return csv_path
