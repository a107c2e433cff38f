"""Probabilities for whole image files through a bundle's ONNX session, TTA as the bundle says.

The trainer's export uses this to verify that the bundle reproduces its TTA results, and to
measure its fp16/int8 variants. No torch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from serving.bundle.preprocess import load_views
from serving.bundle.session import ModelSession


def predict_files(
    session: ModelSession, files: Sequence[Path], *, tta: bool = True, batch_images: int = 16
) -> np.ndarray:
    """Mean probability over the views of every file, (n_files, n_classes), float32: every TTA view
    with tta=True (the default here, whatever the bundle's serving default), the plain one with False."""
    m = session.manifest
    views = m.tta.views_for(tta)
    out = []
    for i in range(0, len(files), batch_images):
        chunk = files[i : i + batch_images]
        x = np.concatenate([load_views(Path(f).read_bytes(), m.preprocessing, views) for f in chunk])
        out.append(session.predict(x, counts=[len(views)] * len(chunk)))
    return np.concatenate(out) if out else np.empty((0, len(m.classes)), np.float32)
