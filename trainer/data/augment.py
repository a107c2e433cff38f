"""Augmentation for training, and the evaluation/TTA settings that go into the export bundle.

Training images get fresh random augmentation every time they are read. Evaluation never does:
validation uses the bundle's plain centre view and TTA its fixed list of named views, both computed
by `serving.bundle.preprocess`, the implementation the server runs too.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from serving.bundle.manifest import CENTER, Preprocessing, TTAView
from serving.bundle.preprocess import make_views, resize_shorter

# --- Random transforms for training. Each takes and returns an 8-bit RGB PIL image or HWC array.


@dataclass(frozen=True)
class RandomRotate:
    """Rotate by a uniform angle in [-deg, deg] degrees, with probability p.

    The corners the rotation uncovers are filled by reflecting the image (as fastai does), not
    with black: black wedges would shift the max-pooled activations the head was fitted on."""

    deg: float = 10.0
    p: float = 0.75

    def __call__(self, im: Image.Image, rng) -> Image.Image:
        if rng.random() >= self.p:
            return im
        angle = rng.uniform(-self.deg, self.deg)
        t = math.radians(abs(angle))
        side = max(im.size)
        pad = math.ceil(0.5 * side * (math.sin(t) + 1 - math.cos(t))) + 2
        a = np.asarray(im)
        pad = min(pad, min(a.shape[:2]) - 1)  # numpy's reflect needs the pad shorter than the image
        if pad <= 0:
            return im.rotate(angle, Image.Resampling.BILINEAR)
        padded = Image.fromarray(np.pad(a, ((pad, pad), (pad, pad), (0, 0)), mode="reflect"))
        rotated = padded.rotate(angle, Image.Resampling.BILINEAR)
        return rotated.crop((pad, pad, pad + im.width, pad + im.height))


@dataclass(frozen=True)
class RandomLighting:
    """Brightness and contrast jitter: x -> (x - 0.5) * (1 + c) + 0.5 + b on the 0-1 scale."""

    b: float = 0.05
    c: float = 0.05

    def __call__(self, a: np.ndarray, rng: random.Random) -> np.ndarray:
        b, c = rng.uniform(-self.b, self.b), rng.uniform(-self.c, self.c)
        x = (a.astype(np.float32) / 255.0 - 0.5) * (1.0 + c) + 0.5 + b
        return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class RandomFlip:
    """Horizontal flip with probability 1/2: for photos taken from the side."""

    def __call__(self, a: np.ndarray, rng: random.Random) -> np.ndarray:
        return a[:, ::-1] if rng.random() < 0.5 else a


@dataclass(frozen=True)
class RandomDihedral:
    """One of the 8 symmetries of the square: for photos taken from above (satellite, microscopy)."""

    def __call__(self, a: np.ndarray, rng: random.Random) -> np.ndarray:
        k = rng.randrange(4)
        a = np.rot90(a, k)
        return a[:, ::-1] if rng.random() < 0.5 else a


transforms_basic = [RandomRotate(10), RandomLighting(0.05, 0.05)]
transforms_side_on = [*transforms_basic, RandomFlip()]
transforms_top_down = [*transforms_basic, RandomDihedral()]

# Deterministic TTA views matching each family of training augmentation: only symmetries the model
# was trained to be invariant to, plus a slightly zoomed crop (training zooms up to max_zoom).
TTA_SIDE_ON = [
    CENTER,
    TTAView(name="hflip", hflip=True),
    TTAView(name="zoom", zoom=1.1),
    TTAView(name="zoom_hflip", zoom=1.1, hflip=True),
]
TTA_TOP_DOWN = [
    CENTER,
    TTAView(name="hflip", hflip=True),
    TTAView(name="vflip", vflip=True),
    TTAView(name="rot90", rot90=1),
    TTAView(name="rot270", rot90=3),
]
TTA_BASIC = [
    CENTER,
    *(TTAView(name=f"zoom_{a}", zoom=1.1, anchor=a) for a in ("top_left", "top_right", "bottom_left", "bottom_right")),
]


def default_tta_views(aug_tfms: Sequence) -> list[TTAView]:
    if any(isinstance(t, RandomDihedral) for t in aug_tfms):
        return list(TTA_TOP_DOWN)
    if any(isinstance(t, RandomFlip) for t in aug_tfms):
        return list(TTA_SIDE_ON)
    return list(TTA_BASIC)


@dataclass(frozen=True)
class Tfms:
    """Training augmentation plus the evaluation preprocessing and TTA views that get exported."""

    prep: Preprocessing
    aug_tfms: tuple = ()
    max_zoom: float = 1.0
    tta_views: tuple[TTAView, ...] = field(default=(CENTER,))

    @property
    def sz(self) -> int:
        return self.prep.input_size

    def eval(self, im: Image.Image) -> np.ndarray:
        """The plain centre view: uint8 (sz, sz, 3)."""
        return make_views(im, self.prep, [self.tta_views[0]])[0]

    def train(self, im: Image.Image, rng=None) -> np.ndarray:
        """A fresh random view: zoom, rotate, random crop, flips, lighting; uint8 (sz, sz, 3)."""
        rng = rng if rng is not None else random  # the module: seeded per worker
        zoom = rng.uniform(1.0, self.max_zoom) if self.max_zoom > 1 else 1.0
        im = resize_shorter(im, round(self.prep.resize_size * zoom), self.prep.interpolation)
        for t in self.aug_tfms:
            if isinstance(t, RandomRotate):
                im = t(im, rng)
        side = self.sz
        left, top = rng.randint(0, im.width - side), rng.randint(0, im.height - side)
        # Cropped in numpy, not PIL: numpy's view of a PIL image is read-only, so a PIL crop would
        # need a further copy to become the writable array torch.from_numpy wants; the copy that
        # ascontiguousarray makes of this slice is writable already.
        a = np.asarray(im, dtype=np.uint8)[top : top + side, left : left + side]
        for t in self.aug_tfms:
            if not isinstance(t, RandomRotate):
                a = t(a, rng)
        return np.ascontiguousarray(a)


def tfms_from_model(
    arch: str,
    sz: int,
    aug_tfms: Sequence = (),
    max_zoom: float = 1.0,
    *,
    crop_pct: float = 0.875,
    interpolation: str = "bilinear",
    tta_views: Sequence[TTAView] | None = None,
) -> Tfms:
    """Transforms for `arch` at `sz` pixels. The shorter side is resized to sz / crop_pct before
    cropping (256 for 224 at the default 0.875); crop_pct=1 keeps the whole square image.
    `arch` is accepted for the lesson's signature: normalisation lives in the network itself."""
    del arch
    if not 0.5 <= crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in [0.5, 1], got {crop_pct}")
    prep = Preprocessing(input_size=sz, resize_size=round(sz / crop_pct), interpolation=interpolation)
    views = list(tta_views) if tta_views is not None else default_tta_views(aug_tfms)
    return Tfms(prep=prep, aug_tfms=tuple(aug_tfms), max_zoom=max_zoom, tta_views=tuple(views))
