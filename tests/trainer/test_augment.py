"""Training augmentation: fresh random views, no mirrored digits, reflected rotation corners."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from serving.bundle.preprocess import resize_shorter
from trainer.data.augment import (
    TTA_BASIC,
    TTA_SIDE_ON,
    TTA_TOP_DOWN,
    RandomRotate,
    tfms_from_model,
    transforms_basic,
    transforms_side_on,
    transforms_top_down,
)


def left_heavy(side=40) -> Image.Image:
    """Square, bright on the left half only: with crop_pct=1 a training view keeps the whole image,
    so a view whose right side is the brighter one was mirrored."""
    a = np.zeros((side, side, 3), np.uint8)
    a[:, : side // 2] = 255
    return Image.fromarray(a)


def mirrored(v: np.ndarray) -> bool:
    return v[:, -10:].astype(float).mean() > v[:, :10].astype(float).mean()


class TestTrainViews:
    def test_shape_and_fresh_randomness(self):
        tfms = tfms_from_model("efficientnet_lite0", 32, aug_tfms=transforms_side_on, max_zoom=1.2)
        rng = random.Random(0)
        grey = Image.fromarray(np.tile(np.linspace(60, 190, 60, dtype=np.uint8), (40, 1))).convert("RGB")
        views = [tfms.train(grey, rng) for _ in range(8)]
        assert all(v.shape == (32, 32, 3) and v.dtype == np.uint8 for v in views)
        assert len({v.tobytes() for v in views}) == 8

    def test_basic_augmentation_never_mirrors(self):
        tfms = tfms_from_model("efficientnet_lite0", 32, aug_tfms=transforms_basic, crop_pct=1.0)
        rng = random.Random(0)
        assert not any(mirrored(tfms.train(left_heavy(), rng)) for _ in range(40))

    def test_side_on_mirrors_about_half_the_time(self):
        tfms = tfms_from_model("efficientnet_lite0", 32, aug_tfms=transforms_side_on, crop_pct=1.0)
        rng = random.Random(0)
        n = sum(mirrored(tfms.train(left_heavy(), rng)) for _ in range(200))
        assert 70 < n < 130

    def test_rotation_fills_corners_by_reflection_not_black(self):
        im = Image.fromarray(np.full((40, 60, 3), 200, np.uint8))
        out = RandomRotate(deg=10, p=1.0)(im, random.Random(3))
        assert out.size == im.size and np.asarray(out).min() == 200

    def test_bare_crop_is_the_pil_crop_and_writable(self):
        # No augmentation (aug="none"): the view is a random crop, made in numpy so that the one copy
        # it needs is writable (torch.from_numpy then shares it instead of warning or copying again).
        tfms = tfms_from_model("efficientnet_lite0", 16, crop_pct=0.5)
        im = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8))
        resized = resize_shorter(im, 32)
        for seed in range(5):
            rng = random.Random(seed)
            left, top = rng.randint(0, resized.width - 16), rng.randint(0, resized.height - 16)
            v = tfms.train(im, random.Random(seed))
            assert np.array_equal(v, np.asarray(resized.crop((left, top, left + 16, top + 16))))
            assert v.flags.writeable and v.flags.c_contiguous


@pytest.mark.parametrize(
    "aug, views",
    [(transforms_side_on, TTA_SIDE_ON), (transforms_top_down, TTA_TOP_DOWN), (transforms_basic, TTA_BASIC)],
)
def test_tta_views_follow_the_augmentation_family(aug, views):
    tfms = tfms_from_model("efficientnet_lite0", 32, aug_tfms=aug)
    assert list(tfms.tta_views) == views and tfms.tta_views[0].name == "center"
    assert not any(v.hflip or v.vflip or v.rot90 for v in TTA_BASIC), "digits must never be flipped"
