"""Predictions as a Kaggle-style submission CSV: one row per image, named by the file's stem."""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from serving.bundle.files import write_atomic

if TYPE_CHECKING:  # annotations only
    from trainer.learn.learner import ConvLearner


def write_submission(learn: ConvLearner, path: Path | str, *, tta: bool = True, top_label: bool = False) -> Path:
    """Predict the learner's test set and write a submission CSV: id, then one probability per
    class (or id, label with top_label=True)."""
    if not learn.data.test_files:
        raise ValueError("no test set: build the data with test_name=FOLDER of unlabelled images")
    probs = learn.TTA("test")[0] if tta else learn.predict_files("test")
    return write_predictions_csv(Path(path), learn.data.test_files, probs, learn.data.classes, top_label=top_label)


def write_predictions_csv(
    path_out: Path | str,
    files: Sequence[Path | str],
    probs,
    classes: Sequence[str],
    *,
    top_label: bool = False,
) -> Path:
    """Write `id,<class 1>,<class 2>,...` with one probability per class, or `id,label` with the
    most probable class when `top_label=True`. Row i is `files[i]`, its id the file name without
    its extension; `probs` is (len(files), len(classes)), e.g. `learn.TTA(is_test=True)` averaged.
    The file appears complete or not at all (atomic write); its folder is created if needed.
    Raises ValueError when the shapes disagree, a probability is not finite, or two files share an id.
    """
    path_out = Path(path_out)
    p = np.asarray(probs, dtype=np.float64)
    if p.shape != (len(files), len(classes)):
        raise ValueError(
            f"probs has shape {p.shape}, expected (len(files), len(classes)) = ({len(files)}, {len(classes)}); "
            "pass the probabilities for exactly these files, in this order"
        )
    if not np.isfinite(p).all():
        rows = sorted({int(i) for i in np.argwhere(~np.isfinite(p))[:, 0]})
        raise ValueError(f"probs has NaN or infinite values in rows {rows[:5]}: {Path(files[rows[0]]).name} ...")
    ids = [Path(f).stem for f in files]
    repeated = [i for i, k in Counter(ids).items() if k > 1]
    if repeated:
        raise ValueError(
            f"{len(repeated)} ids name more than one file (e.g. {repeated[:5]}): an id is the file name without "
            "its extension, so images in different folders or formats must have different names"
        )

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if top_label:
        writer.writerow(["id", "label"])
        writer.writerows([i, classes[k]] for i, k in zip(ids, p.argmax(axis=1), strict=True))
    else:
        writer.writerow(["id", *classes])
        # 7 significant digits: the precision of float32, the dtype the model produces.
        writer.writerows([i, *(f"{x:.7g}" for x in row)] for i, row in zip(ids, p, strict=True))
    path_out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path_out, buf.getvalue().encode("utf-8"))
    return path_out
