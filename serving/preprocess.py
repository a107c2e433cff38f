"""Preprocessing for evaluation and TTA: the one implementation shared by trainer and server.

bytes -> decoded RGB image (EXIF orientation applied) -> shorter side resized -> one uint8 array
per TTA view. The trainer's validation, TTA and export parity checks call exactly these functions,
so the probabilities the server returns equal the trainer's TTA probabilities. No torch here.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from serving.bundle import Preprocessing, TTAView

# A decompression bomb is refused before its pixels are decoded: 50 megapixels is a 8660x5773 photo.
DEFAULT_MAX_PIXELS = 50_000_000

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


class ImageError(ValueError):
    """An image that cannot be used; the message says what was wrong with it."""


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an encoded image into 8-bit RGB, upright as its EXIF orientation says."""
    if not data:
        raise ImageError("empty image: the request carried no bytes")
    try:
        with warnings.catch_warnings():
            # We enforce our own pixel limit below; PIL's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            width, height = im.size
            if width * height > max_pixels:
                raise ImageError(
                    f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
                )
            im.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not a recognised image format (expected JPEG, PNG, WebP, BMP, ...)") from None
    except Image.DecompressionBombError as e:
        # PIL refuses sizes past twice its own limit while opening, before our check above can run.
        raise ImageError(f"decompression bomb refused: {e} (this limit: {max_pixels} pixels)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"corrupt or truncated image: {e}") from None
    if im.width < 1 or im.height < 1:
        raise ImageError(f"image has no pixels ({im.width}x{im.height})")
    im = ImageOps.exif_transpose(im)
    return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: 16-bit greyscale is scaled, transparency is laid on white."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im, dtype=np.uint32 if im.mode == "I" else np.uint16).astype(np.float64)
        peak = 65535.0 if im.mode != "I" or a.max() > 255 else 255.0
        a8 = np.clip(np.round(a / peak * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(a8, mode="L").convert("RGB")
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float32)
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")


def resize_shorter(im: Image.Image, size: int, interpolation: str = "bilinear") -> Image.Image:
    """Resize so that the shorter side is `size` pixels, keeping the aspect ratio."""
    width, height = im.size
    scale = size / min(width, height)
    new = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new == (width, height):
        return im
    return im.resize(new, _RESAMPLE[interpolation], reducing_gap=None)


def crop_box(width: int, height: int, side: int, anchor: str) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a side x side square at `anchor` inside width x height."""
    left = {"center": (width - side) // 2, "top_left": 0, "bottom_left": 0}.get(anchor, width - side)
    top = {"center": (height - side) // 2, "top_left": 0, "top_right": 0}.get(anchor, height - side)
    return left, top, left + side, top + side


def view(im: Image.Image, prep: Preprocessing, spec: TTAView) -> np.ndarray:
    """One view of an image already resized by `resize_shorter`: uint8 (size, size, 3)."""
    size = prep.input_size
    side = min(round(size / spec.zoom), im.width, im.height)
    out = im.crop(crop_box(im.width, im.height, side, spec.anchor))
    if out.size != (size, size):
        out = out.resize((size, size), _RESAMPLE[prep.interpolation], reducing_gap=None)
    a = np.asarray(out, dtype=np.uint8)
    if spec.hflip:
        a = a[:, ::-1]
    if spec.vflip:
        a = a[::-1]
    if spec.rot90:
        a = np.rot90(a, spec.rot90)
    return np.ascontiguousarray(a)


def make_views(im: Image.Image, prep: Preprocessing, views: Sequence[TTAView]) -> np.ndarray:
    """All views of a decoded RGB image: uint8 (n_views, size, size, 3), the graph's input layout."""
    resized = resize_shorter(im, prep.resize_size, prep.interpolation)
    return np.stack([view(resized, prep, spec) for spec in views])


def load_views(
    data: bytes, prep: Preprocessing, views: Sequence[TTAView], *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Encoded image bytes -> uint8 (n_views, size, size, 3)."""
    return make_views(decode_image(data, max_pixels=max_pixels), prep, views)
