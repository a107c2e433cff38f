"""Training plots as pure functions: lr schedule, losses, confusion matrix, and the lesson's image grids.

Plain lists and arrays in, PNG files out; no learner objects. Each plot is two functions: a
`*_figure` builder that draws a matplotlib Figure (what tests inspect: the lines, image and labels
drawn) and a `plot_*` saver that writes it as a PNG. Figures are drawn on matplotlib's Agg canvas
without pyplot (no global state, so it is thread-safe and needs no display) and written with
`serving.bundle.files.write_atomic`, so a reader never sees half a PNG.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from serving.bundle.files import write_atomic
from serving.bundle.preprocess import decode_image

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100
# Above this many classes the cells are too small for readable numbers: the colour alone tells.
MAX_ANNOTATED_CLASSES = 20
# The restart lines' gid, by which a reader of the Figure tells them from the lr curves.
RESTART_GID = "restart"


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig: Figure, path: Path | str) -> Path:
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buf.getvalue())
    return path


# --- training curves -----------------------------------------------------------------------------


def restart_steps(lr_history: Sequence[Sequence[float]] | np.ndarray) -> list[int]:
    """Batches at which any group's lr rises: SGDR's lr only falls within a cycle, so a rise is a
    warm restart (the first batch is not counted)."""
    lrs = np.asarray(lr_history, dtype=np.float64)
    if len(lrs) < 2:
        return []
    # A relative tolerance so that float noise in a flat schedule is not taken for a restart.
    rises = (lrs[1:] > lrs[:-1] * (1 + 1e-9)).any(axis=1)
    return [int(i) + 1 for i in np.flatnonzero(rises)]


def plot_schedule(
    lr_history: Sequence[Sequence[float]], path: Path | str, *, group_names: Sequence[str] = ("early", "late", "head")
) -> Path:
    """`schedule_figure` written as a PNG at `path`; returns the path."""
    return _save_png(schedule_figure(lr_history, group_names=group_names), path)


def schedule_figure(
    lr_history: Sequence[Sequence[float]], *, group_names: Sequence[str] = ("early", "late", "head")
) -> Figure:
    """The lr of every layer group per training batch (log y axis), with a faint vertical line at each
    warm restart (gid RESTART_GID). `lr_history` holds one row per batch, one lr per group
    (ConvLearner.lr_history).

    Groups are labelled with `group_names` when it has one name per group, else "group 0", "group 1",
    ... Non-positive lrs are left out (a log axis cannot show them). Raises ValueError when the
    history is empty or its rows differ in length."""
    if not len(lr_history):
        raise ValueError("plot_schedule: the lr history is empty; train for at least one batch first")
    widths = {len(row) for row in lr_history}
    if len(widths) != 1 or 0 in widths:
        raise ValueError(
            f"plot_schedule: every batch needs one lr per layer group, got rows of lengths {sorted(widths)}"
        )
    lrs = np.asarray(lr_history, dtype=np.float64)
    n_groups = lrs.shape[1]
    names = list(group_names) if len(group_names) == n_groups else [f"group {i}" for i in range(n_groups)]
    fig = _figure(7, 4)
    ax = fig.subplots()
    steps = np.arange(len(lrs))
    for restart in restart_steps(lrs):
        ax.axvline(restart, color="0.6", linewidth=0.8, alpha=0.5, gid=RESTART_GID)
    for g, name in enumerate(names):
        # A one-batch history is a single point: the marker keeps it visible.
        ax.plot(steps, np.where(lrs[:, g] > 0, lrs[:, g], np.nan), label=name, marker="." if len(lrs) == 1 else None)
    ax.set(yscale="log", xlabel="batch", ylabel="learning rate")
    ax.legend(title="layer group")
    return fig


def plot_losses(history: Sequence[Mapping], path: Path | str) -> Path:
    """`losses_figure` written as a PNG at `path`; returns the path."""
    return _save_png(losses_figure(history), path)


def losses_figure(history: Sequence[Mapping]) -> Figure:
    """Training and validation loss per epoch, and accuracy on a second y axis. `history` rows are
    mappings with keys epoch, trn_loss, val_loss, accuracy (`vars(EpochStats)`; other keys are
    ignored). The first axes hold the two losses, its twin the accuracy. NaN values leave a gap.
    Raises ValueError when the history is empty or a row lacks a key."""
    if not len(history):
        raise ValueError("plot_losses: the history is empty; train for at least one epoch first")
    keys = ("epoch", "trn_loss", "val_loss", "accuracy")
    for i, row in enumerate(history):
        missing = [k for k in keys if k not in row]
        if missing:
            raise ValueError(f"plot_losses: history row {i} lacks {missing}; each row needs {list(keys)}")
    from matplotlib.ticker import MaxNLocator

    col = {k: np.asarray([float(row[k]) for row in history]) for k in keys}
    # Markers, so that a single epoch (or a point between NaNs) still shows.
    fig = _figure(7, 4)
    ax = fig.subplots()
    ax.plot(col["epoch"], col["trn_loss"], marker="o", color="tab:blue", label="training loss")
    ax.plot(col["epoch"], col["val_loss"], marker="o", color="tab:orange", label="validation loss")
    ax.set(xlabel="epoch", ylabel="loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    acc_ax = ax.twinx()
    acc_ax.plot(col["epoch"], col["accuracy"], marker="s", linestyle="--", color="tab:green", label="accuracy")
    acc_ax.set_ylabel("accuracy")
    lines = ax.get_lines() + acc_ax.get_lines()
    # Outside the axes: the twin axis is drawn over the first, so a legend inside would be hidden.
    fig.legend(lines, [str(line.get_label()) for line in lines], loc="outside upper center", ncols=3)
    return fig


def plot_confusion_matrix(cm: np.ndarray, classes: Sequence[str], path: Path | str, *, normalize: bool = False) -> Path:
    """`confusion_matrix_figure` written as a PNG at `path`; returns the path."""
    return _save_png(confusion_matrix_figure(cm, classes, normalize=normalize), path)


def confusion_matrix_figure(cm: np.ndarray, classes: Sequence[str], *, normalize: bool = False) -> Figure:
    """A heat map of counts[true, predicted] (trainer.evaluate.metrics.confusion_matrix): true class on y,
    predicted on x, the value in each cell when there are at most MAX_ANNOTATED_CLASSES classes
    (beyond that the numbers would be unreadable: the colour alone tells).

    `normalize=True` shows each row as fractions of its true class (a row with no images stays 0).
    Fonts shrink as classes grow; about 50 classes still read. The figure is at most 17.5 x 16
    inches (1750 x 1600 px) however many classes there are. Raises ValueError when `cm` is not
    square or `classes` does not name every row."""
    counts = np.asarray(cm, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] == 0:
        raise ValueError(f"plot_confusion_matrix: cm must be a square (n, n) array, got shape {counts.shape}")
    n = counts.shape[0]
    if len(classes) != n:
        raise ValueError(f"plot_confusion_matrix: {len(classes)} class names for a {n}x{n} matrix")
    if normalize:
        totals = counts.sum(axis=1, keepdims=True)
        values = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
        vmax, fmt = 1.0, "{:.2f}"
    else:
        values, vmax, fmt = counts, max(1.0, float(counts.max())), "{:.0f}"
    from matplotlib.colors import Normalize

    side = min(16.0, 3.0 + 0.3 * n)  # inches: ~0.3 in per class, capped so 50 classes stay one page
    label_size = 10 if n <= 10 else max(5.0, 10 - (n - 10) * 0.15)
    fig = _figure(side + 1.5, side)
    ax = fig.subplots()
    cmap, norm = "Blues", Normalize(vmin=0.0, vmax=vmax)
    image = ax.imshow(values, cmap=cmap, norm=norm, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of true class" if normalize else "images")
    ticks = np.arange(n)
    ax.set_xticks(ticks, [str(c) for c in classes], rotation=90 if n > 6 else 0, fontsize=label_size)
    ax.set_yticks(ticks, [str(c) for c in classes], fontsize=label_size)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix" + (" (normalized by row)" if normalize else ""))
    if n <= MAX_ANNOTATED_CLASSES:
        colours = image.cmap(norm(values))
        for i in range(n):
            for j in range(n):
                r, g, b, _ = colours[i, j]
                # Rec. 601 luma: white text on dark cells, black on light ones.
                text = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"
                ax.text(j, i, fmt.format(values[i, j]), ha="center", va="center", color=text, fontsize=label_size)
    return fig


# --- the lesson's selections: which images to look at --------------------------------------------


def _check(probs: np.ndarray, y: np.ndarray | None, k: int, name: str) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"{name}: probs must be (n_images, n_classes) with 2+ classes, got shape {probs.shape}")
    if y is not None and np.shape(y) != (len(probs),):
        raise ValueError(f"{name}: need one label per row of probs, got {np.shape(y)} labels for {len(probs)} rows")
    if k < 0:
        raise ValueError(f"{name}: k must be >= 0, got {k}")
    return probs


def _top(candidates: np.ndarray, score: np.ndarray, k: int) -> np.ndarray:
    """The k candidates with the highest score; a stable sort keeps equal scores in index order."""
    order = np.argsort(-score[candidates], kind="stable")
    return candidates[order[:k]].astype(np.int64)


def most_correct(probs: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Indices of up to k correctly predicted rows, highest probability of the true class first."""
    probs = _check(probs, y, k, "most_correct")
    y = np.asarray(y, dtype=np.int64)
    p_true = probs[np.arange(len(y)), y]
    return _top(np.flatnonzero(probs.argmax(axis=1) == y), p_true, k)


def most_incorrect(probs: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Indices of up to k wrongly predicted rows, highest probability of the (wrong) predicted class
    first: the most confident mistakes."""
    probs = _check(probs, y, k, "most_incorrect")
    y = np.asarray(y, dtype=np.int64)
    return _top(np.flatnonzero(probs.argmax(axis=1) != y), probs.max(axis=1), k)


def most_uncertain(probs: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k rows whose two most probable classes are closest (smallest top-1 minus top-2
    margin; for two classes, the top probability closest to 0.5), right or wrong."""
    probs = _check(probs, None, k, "most_uncertain")
    top2 = np.sort(probs, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    return _top(np.arange(len(probs)), -margin, k)


def image_grid_titles(probs: np.ndarray, y: np.ndarray, classes: Sequence[str], idx: Sequence[int]) -> list[str]:
    """One title per index in `idx`: "true X\\npred Y (p=0.93)", p the predicted class's probability."""
    probs, y = np.asarray(probs), np.asarray(y)
    titles = []
    for i in idx:
        pred = int(probs[i].argmax())
        titles.append(f"true {classes[int(y[i])]}\npred {classes[pred]} (p={probs[i, pred]:.2f})")
    return titles


def plot_image_grid(
    files: Sequence[Path | str], titles: Sequence[str], path: Path | str, *, cols: int = 4, thumb: int = 160
) -> Path:
    """`image_grid_figure` written as a PNG at `path`; returns the path."""
    return _save_png(image_grid_figure(files, titles, cols=cols, thumb=thumb), path)


def image_grid_figure(files: Sequence[Path | str], titles: Sequence[str], *, cols: int = 4, thumb: int = 160) -> Figure:
    """Thumbnails of `files` in a grid, `cols` wide, each at most `thumb` pixels on its longer side
    (aspect ratio kept, EXIF orientation applied) with its title above. A file that cannot be read
    gets a cell saying so rather than failing the whole grid; an empty list writes a small PNG that
    says "no images". Raises ValueError when titles and files differ in number."""
    if len(titles) != len(files):
        raise ValueError(f"plot_image_grid: {len(files)} files but {len(titles)} titles; give one title per file")
    if cols < 1 or thumb < 1:
        raise ValueError(f"plot_image_grid: cols and thumb must be >= 1, got cols={cols}, thumb={thumb}")
    if not files:
        fig = _figure(3, 1.5)
        fig.text(0.5, 0.5, "no images", ha="center", va="center", fontsize=14)
        return fig
    cols = min(cols, len(files))
    rows = math.ceil(len(files) / cols)
    title_lines = max(str(t).count("\n") + 1 for t in titles)
    # Each cell: the thumbnail plus ~0.16 in per title line at 8 pt.
    cell_w, cell_h = max(thumb / DPI, 1.2), thumb / DPI + 0.16 * title_lines + 0.1
    fig = _figure(cols * cell_w, rows * cell_h)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, f, title in zip(axes[: len(files)], files, titles, strict=True):
        try:
            im = decode_image(Path(f).read_bytes())
            im.thumbnail((thumb, thumb))
            ax.imshow(np.asarray(im))
        except (OSError, ValueError):  # ImageError is a ValueError
            ax.text(
                0.5,
                0.5,
                f"cannot read\n{Path(f).name}",
                ha="center",
                va="center",
                fontsize=8,
                color="tab:red",
                transform=ax.transAxes,
            )
        ax.set_title(str(title), fontsize=8)
    return fig


# --- calibration ---------------------------------------------------------------------------------


def plot_reliability(curves: Mapping[str, np.ndarray], y: np.ndarray, path: Path | str) -> Path:
    """`reliability_figure` written as a PNG at `path`; returns the path."""
    return _save_png(reliability_figure(curves, y), path)


def reliability_figure(curves: Mapping[str, np.ndarray], y: np.ndarray) -> Figure:
    """A reliability diagram: for each named set of probabilities (n, classes) on labels y, the
    accuracy in each confidence bin against the bin's mean confidence, with the diagonal a perfectly
    calibrated model would follow; each label ends with its expected calibration error. Raises
    ValueError when there are no curves or no labels."""
    from trainer.evaluate.calibrate import expected_calibration_error, reliability

    if not curves or not len(y):
        raise ValueError("plot_reliability: needs at least one set of probabilities and some labels")
    fig = _figure(5, 5)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfect calibration")
    for name, probs in curves.items():
        conf, acc, count = reliability(probs, y)
        shown = count > 0
        ece = expected_calibration_error(probs, y)
        ax.plot(conf[shown], acc[shown], marker="o", label=f"{name}: ECE {ece:.3f}")
    ax.set(xlabel="confidence (top class probability)", ylabel="accuracy", xlim=(0, 1.02), ylim=(0, 1.02))
    ax.set_title("reliability on validation (with TTA)")
    ax.legend(loc="upper left")
    return fig
