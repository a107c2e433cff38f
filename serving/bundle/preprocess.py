"""Preprocessing for evaluation and TTA: the one implementation shared by trainer and server.

bytes -> decoded RGB image (EXIF orientation applied) -> shorter side resized -> one uint8 array
per TTA view. The trainer's validation, TTA and export parity checks call exactly these functions,
so the probabilities the server returns equal the trainer's TTA probabilities. No torch here.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from serving.bundle.manifest import Preprocessing, TTAView

# A decompression bomb is refused before its pixels are decoded: 50 megapixels is a 8660x5773 photo.
DEFAULT_MAX_PIXELS = 50_000_000
# Formats whose decoders see bytes from anyone. Pillow knows ~40 more, some of which hand the bytes
# to an interpreter (EPS goes to Ghostscript) or to rarely exercised parsers; they are refused by name.
DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
# Resizing the shorter side of a 1 x 300,000 strip up to 256 pixels would make 77 gigapixels: the
# long side is cut (centred) to this many times the short side before resizing, which bounds the
# work after resizing to MAX_ASPECT_RATIO x size^2 pixels whatever the image's shape.
MAX_ASPECT_RATIO = 10
# Peak memory while one image is decoded and its views made, bytes per decoded pixel, measured with
# VmHWM (tests/serving/test_preprocess_fuzz.py): a transparent WebP needs 20 (libwebp's buffer, Pillow's copy,
# the white background, the composite, RGB), a transparent PNG 16, a 16-bit PNG 11, a CMYK JPEG 8.4
# and an RGB JPEG 4.4. It sizes how many pixels the server lets all calls decode at once.
PEAK_BYTES_PER_PIXEL = 24

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
# Pillow's own refusal message carries the size it found: "Image size (400000000 pixels) exceeds ..."
_PILLOW_BOMB_SIZE = re.compile(r"\((\d+) pixels\)")


class ImageError(ValueError):
    """An image that cannot be used; the message says what was wrong with it."""


class PixelLimitError(ImageError):
    """An image with more pixels than the reader allows; `pixels` is how many it has (0: unknown)."""

    def __init__(self, message: str, pixels: int = 0):  # optional: torch re-raises as type(e)(message)
        super().__init__(message)
        self.pixels = pixels


def open_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, formats: Sequence[str] = DEFAULT_FORMATS
) -> Image.Image:
    """Read an encoded image's header only: its format must be one of `formats` and its size at
    most `max_pixels`. Nothing is decoded yet, so this is cheap whatever the image claims to be."""
    if not data:
        raise ImageError("empty image: no bytes")
    try:
        with warnings.catch_warnings():
            # Pillow warns past its own 89 MP; the limit that counts is max_pixels, checked below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=list(formats))
    except UnidentifiedImageError:
        found = sniff_format(data)
        if found is not None and found not in formats:
            raise ImageError(f"{found} images are not accepted; use one of {', '.join(formats)}") from None
        raise ImageError(f"not a recognised image format (expected one of {', '.join(formats)})") from None
    except Image.DecompressionBombError as e:
        # Pillow refuses sizes past twice its own limit while opening, before our check below runs.
        size = _PILLOW_BOMB_SIZE.search(str(e))
        pixels = int(size[1]) if size else 0
        claimed = f"{pixels} pixels" if pixels else "far too many pixels"
        raise PixelLimitError(
            f"image is {claimed}, over the limit of {max_pixels} (decompression bomb refused)", pixels
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"corrupt or truncated image: {e}") from None
    width, height = im.size
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise PixelLimitError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}", width * height
        )
    return im


def sniff_format(data: bytes) -> str | None:
    """The format Pillow would take `data` for, from its leading bytes alone (no parser runs)."""
    Image.init()
    prefix = data[:16]
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        try:
            if accept is not None and accept(prefix):
                return name
        except (struct.error, IndexError, TypeError, ValueError):  # a prefix too short for its test
            continue
    return None


def load_rgb(im: Image.Image) -> Image.Image:
    """Decode an opened image into 8-bit RGB, upright as its EXIF orientation says."""
    try:
        im.load()
        # exif_transpose copies even an upright image; that copy of a 50-megapixel photo is 200 MB.
        im = ImageOps.exif_transpose(im) if _needs_transpose(im) else im
        return to_rgb(im)
    except (
        OSError,
        SyntaxError,
        ValueError,
        EOFError,
        struct.error,
        IndexError,
        KeyError,
        TypeError,
        ZeroDivisionError,
    ) as e:
        # Pillow's parsers let these out on crafted files; each means the bytes are not a usable image.
        raise ImageError(f"corrupt or truncated image: {type(e).__name__}: {e}") from None


def _needs_transpose(im: Image.Image) -> bool:
    orientation = im.getexif().get(0x0112, 1)
    return orientation in (2, 3, 4, 5, 6, 7, 8)


def decode_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, formats: Sequence[str] = DEFAULT_FORMATS
) -> Image.Image:
    """Decode an encoded image into 8-bit RGB, upright as its EXIF orientation says."""
    return load_rgb(open_image(data, max_pixels=max_pixels, formats=formats))


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: 16-bit greyscale is scaled, transparency is laid on white."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # round(v / 65535 * 255) is (v + 128) // 257 exactly (65535 = 255 x 257, and no v lies on a
        # tie): integers instead of float64 keep a 50-megapixel 16-bit PNG from needing 400 MB more.
        a: np.ndarray = np.asarray(im, dtype=np.int64 if im.mode == "I" else np.uint32)
        if im.mode == "I" and a.max() <= 255:
            a8 = np.clip(a, 0, 255).astype(np.uint8)
        else:
            np.clip(a, 0, 65535, out=a)
            a += 128
            a //= 257
            a8 = a.astype(np.uint8)
        return Image.fromarray(a8, mode="L").convert("RGB")
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float32)
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im if im.mode == "RGBA" else im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")


def resize_shorter(im: Image.Image, size: int, interpolation: str = "bilinear") -> Image.Image:
    """Resize so that the shorter side is `size` pixels, keeping the aspect ratio; a longer side
    than MAX_ASPECT_RATIO times the shorter is first cut to that, keeping its middle."""
    im = cap_aspect_ratio(im)
    width, height = im.size
    scale = size / min(width, height)
    new = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new == (width, height):
        return im
    return im.resize(new, _RESAMPLE[interpolation], reducing_gap=None)


def cap_aspect_ratio(im: Image.Image, ratio: int = MAX_ASPECT_RATIO) -> Image.Image:
    """The middle of `im` at most `ratio` times as long as it is wide (or tall); `im` itself when it is."""
    width, height = im.size
    short = min(width, height)
    if max(width, height) <= ratio * short:
        return im
    if width > height:
        return im.crop(crop_box(width, height, (ratio * short, short), "center"))
    return im.crop(crop_box(width, height, (short, ratio * short), "center"))


def crop_box(width: int, height: int, side: int | tuple[int, int], anchor: str) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a `side` square (or (w, h) rectangle) at `anchor` inside width x height."""
    w, h = (side, side) if isinstance(side, int) else side
    left = {"center": (width - w) // 2, "top_left": 0, "bottom_left": 0}.get(anchor, width - w)
    top = {"center": (height - h) // 2, "top_left": 0, "top_right": 0}.get(anchor, height - h)
    return left, top, left + w, top + h


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


# admit(pixels) -> a context held while an image of that many pixels is decoded and its views made.
Admit = Callable[[int], AbstractContextManager]


def load_views(
    data: bytes,
    prep: Preprocessing,
    views: Sequence[TTAView],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    formats: Sequence[str] = DEFAULT_FORMATS,
    admit: Admit = lambda pixels: nullcontext(),
) -> np.ndarray:
    """Encoded image bytes -> uint8 (n_views, size, size, 3).

    `admit` is called with the image's pixel count once its header is read and before any pixel is
    decoded; the server uses it to bound the memory all calls decode with at once, and to stop
    work whose caller is gone. It may raise to refuse the image."""
    im = open_image(data, max_pixels=max_pixels, formats=formats)
    with admit(im.width * im.height):
        return make_views(load_rgb(im), prep, views)
