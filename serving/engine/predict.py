"""The work behind Predict, as plain functions: bytes in, ranked probabilities out. No network.

The server splits it in two: decoding and the TTA views run in a decoding process
(serving.engine.decoders); `run_batch` is the batch step the batcher calls with the views of
several calls at once, so that all of them go through ONNX Runtime in one run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from serving.bundle.manifest import Manifest
from serving.bundle.preprocess import ImageError, make_views
from serving.bundle.session import ModelSession


@dataclass(frozen=True)
class Prepared:
    views: np.ndarray  # uint8 (n_views, size, size, 3)
    names: list[str]  # the TTA views' names, in that order


def top(probabilities: np.ndarray, k: int = 0) -> list[tuple[int, float]]:
    """(class index, probability), most probable first (ties by index); k=0 gives every class."""
    order = np.argsort(-probabilities, kind="stable")
    if k:
        order = order[:k]
    return [(int(i), float(probabilities[i])) for i in order]


def prepare_pixels(manifest: Manifest, pixels: np.ndarray, *, tta: bool | None = None) -> Prepared:
    """The views of an image sent as uint8 RGB pixels (height, width, 3) instead of a file: made as
    from a decoded image, so that the same picture gets the same views either way."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ImageError(f"pixels must be uint8 (height, width, 3), got {pixels.dtype} {pixels.shape}")
    views = manifest.tta.views_for(tta)
    return Prepared(make_views(Image.fromarray(pixels), manifest.preprocessing, views), [v.name for v in views])


def run_batch(session: ModelSession, batch: list[np.ndarray]) -> list[np.ndarray]:
    """The batch step: the views of several images, run through ONNX Runtime in one call, and each
    image's probabilities averaged over its own views. Returns one (n_classes,) array per image."""
    if not batch:
        return []
    return list(session.predict(np.concatenate(batch), counts=[len(v) for v in batch]))
