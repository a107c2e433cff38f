"""The work behind Predict, as plain functions: bytes in, ranked probabilities out. No network.

The server splits it in two: `prepare` (decode, check, make the TTA views) runs in each call's
handler thread, in parallel; `run_batch` is the batch step the batcher calls with the views of
several calls at once, so that all of them go through ONNX Runtime in one run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from serving.bundle import Manifest
from serving.preprocess import DEFAULT_FORMATS, DEFAULT_MAX_PIXELS, Admit, ImageError, load_views, make_views
from serving.session import ModelSession


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


def prepare(
    manifest: Manifest,
    data: bytes,
    *,
    tta: bool | None = None,
    max_bytes: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    formats: Sequence[str] = DEFAULT_FORMATS,
    admit: Admit | None = None,
) -> Prepared:
    """Check and decode one encoded image and make the bundle's views of it: all of them with
    tta=True, only the first, plain one with tta=False, and as the bundle's `tta.default` says with
    None (a call that does not say). Raises ImageError saying what was wrong; `admit` is load_views'
    hook for bounding the decoding work."""
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageError(
            f"image is {len(data)} bytes, over the limit of {max_bytes}; the model sees "
            f"{manifest.preprocessing.input_size}x{manifest.preprocessing.input_size} pixels, so send a smaller file"
        )
    views = manifest.tta.views_for(tta)
    limits = {} if admit is None else {"admit": admit}
    views_array = load_views(data, manifest.preprocessing, views, max_pixels=max_pixels, formats=formats, **limits)
    return Prepared(views_array, [v.name for v in views])


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
