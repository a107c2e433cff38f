"""Property-based fuzzing of the decode/preprocess path a request's bytes go through.

Mutated real JPEG/PNG/WebP/GIF/TIFF files and crafted headers (extreme dimensions and aspect ratios,
every PNG bit depth and colour type, GIFs claiming thousands of frames): every input either becomes
views of the right shape or raises ImageError, never anything else; none takes more than a second;
and the peak resident memory of one input stays under PEAK_BYTES_PER_PIXEL x MAX_PIXELS + 64 MB.
"""

from __future__ import annotations

import io
import struct
import zlib
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from serving.bundle.manifest import CENTER, Preprocessing, TTAView
from serving.bundle.preprocess import PEAK_BYTES_PER_PIXEL, ImageError, load_views

MAX_PIXELS = 4_000_000
MEMORY_BOUND_KB = (PEAK_BYTES_PER_PIXEL * MAX_PIXELS + 64 * 2**20) // 1024
PREP = Preprocessing(input_size=32, resize_size=37)
VIEWS = [CENTER, TTAView(name="zoom", zoom=1.1, anchor="bottom_right", hflip=True)]
# Pillow warns about what it finds in hostile files (corrupt EXIF, sizes past its own limit before
# ours refuses them): expected here; the server counts them (serving/engine/decoder_log.py).
pytestmark = pytest.mark.filterwarnings("ignore:::PIL")
HYMENOPTERA = Path(__file__).resolve().parents[3] / "shared" / "data" / "hymenoptera"

FUZZ = settings(
    max_examples=1500,
    deadline=1000,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@cache
def seeds() -> tuple[bytes, ...]:
    """Real encoded files: a photo from the shared data when present, and small made ones of every format."""
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8))
    made = []
    for fmt, mode, kw in [
        ("JPEG", "RGB", {"quality": 80}),
        ("JPEG", "CMYK", {}),
        ("PNG", "RGBA", {}),
        ("PNG", "P", {}),
        ("PNG", "I;16", {}),
        ("WEBP", "RGB", {}),
        ("GIF", "P", {}),
        ("TIFF", "RGB", {"compression": "tiff_deflate"}),
        ("BMP", "RGB", {}),
    ]:
        buf = io.BytesIO()
        (im.convert("L").convert(mode) if mode == "I;16" else im.convert(mode)).save(buf, fmt, **kw)
        made.append(buf.getvalue())
    photos = sorted((HYMENOPTERA / "val" / "ants").glob("*.jpg"))[:1] if HYMENOPTERA.is_dir() else []
    return tuple(made) + tuple(p.read_bytes() for p in photos)


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident size
        return True
    except OSError:
        return False


def peak_rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/self/status")


def check(data: bytes) -> None:
    measured = reset_peak_rss()
    base = peak_rss_kb() if measured else 0
    try:
        out = load_views(data, PREP, VIEWS, max_pixels=MAX_PIXELS)
    except ImageError:
        pass
    else:
        assert out.shape == (len(VIEWS), 32, 32, 3) and out.dtype == np.uint8
    if measured:
        assert peak_rss_kb() - base < MEMORY_BOUND_KB, f"one input took {(peak_rss_kb() - base) // 1024} MB"


mutation = st.tuples(st.integers(0, 2**31), st.sampled_from(["set", "insert", "delete"]), st.integers(0, 255))


@FUZZ
@given(seed=st.integers(0, 2**31), mutations=st.lists(mutation, min_size=1, max_size=8), cut=st.integers(0, 2**31))
def test_mutated_real_files(seed, mutations, cut):
    files = seeds()
    data = bytearray(files[seed % len(files)])
    for where, how, value in mutations:
        i = where % len(data)
        if how == "set":
            data[i] = value
        elif how == "insert":
            data[i:i] = bytes([value])
        elif len(data) > 1:
            del data[i]
    if cut % 4 == 0:  # a quarter of them truncated too
        data = data[: cut % len(data) + 1]
    check(bytes(data))


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


dimension = st.one_of(st.integers(1, 8), st.integers(1, 70_000), st.integers(1, 2**31 - 1))


@FUZZ
@given(
    width=dimension,
    height=dimension,
    depth=st.sampled_from([1, 2, 4, 8, 16]),
    colour=st.sampled_from([0, 2, 3, 4, 6]),
    body=st.binary(max_size=300),
    compress=st.booleans(),
)
def test_crafted_png_headers(width, height, depth, colour, body, compress):
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    idat = zlib.compress(body * 50) if compress else body
    plte = png_chunk(b"PLTE", bytes(range(48))) if colour == 3 else b""
    check(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + plte + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""))


@FUZZ
@given(
    width=st.integers(1, 65535),
    height=st.integers(1, 65535),
    frames=st.integers(1, 3000),
    frame_w=st.integers(0, 65535),
    frame_h=st.integers(0, 65535),
)
def test_crafted_gifs(width, height, frames, frame_w, frame_h):
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + bytes(6)  # 2-colour palette
    frame = (
        b"\x21\xf9\x04\x00\x01\x00\x00\x00"  # graphic control: 10 ms
        + b"\x2c"
        + struct.pack("<HHHHB", 0, 0, frame_w, frame_h, 0)
        + b"\x02\x02\x44\x01\x00"
    )
    check(screen + frame * min(frames, 3000) + b"\x3b")


@FUZZ
@given(
    width=st.integers(-(2**31), 2**31 - 1),
    height=st.integers(-(2**31), 2**31 - 1),
    bits=st.sampled_from([1, 4, 8, 16, 24, 32]),
    body=st.binary(max_size=200),
)
def test_crafted_bmp_headers(width, height, bits, body):
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bits, 0, len(body), 2835, 2835, 0, 0)
    check(b"BM" + struct.pack("<IHHI", 14 + 40 + len(body), 0, 0, 14 + 40) + info + body)


@FUZZ
@given(
    width=st.integers(0, 65535),
    height=st.integers(0, 65535),
    components=st.sampled_from([1, 3, 4]),
    seed=st.integers(0, 2**31),
)
def test_crafted_jpeg_frame_sizes(width, height, components, seed):
    """A real JPEG whose start-of-frame claims another size: the decoder must notice, or decode within bounds."""
    rng = np.random.default_rng(seed % 1000)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).convert(
        {1: "L", 3: "RGB", 4: "CMYK"}[components]
    ).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    assert sof > 0
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    check(bytes(data))


def test_the_memory_bound_is_measured_here():
    if not reset_peak_rss():
        pytest.skip("/proc/self/clear_refs cannot be written here, so the per-input memory bound is not checked")
    big = np.zeros((64 * 2**20,), np.uint8)
    big[::4096] = 1  # touch every page: 64 MB resident
    assert peak_rss_kb() >= 60 * 1024


@pytest.mark.parametrize(
    "mode, fmt", [("RGBA", "PNG"), ("RGBA", "WEBP"), ("I;16", "PNG"), ("CMYK", "JPEG"), ("RGB", "JPEG")]
)
def test_the_worst_formats_stay_within_the_stated_bytes_per_pixel(mode, fmt):
    """PEAK_BYTES_PER_PIXEL sizes the server's decode budget: check it on the modes that cost most."""
    if not reset_peak_rss():
        pytest.skip("/proc/self/clear_refs cannot be written here, so peak memory cannot be measured")
    w, h = 2500, 2000
    ramp = (np.arange(w)[None, :] * 255 // w + np.zeros((h, 1), int)).astype(np.uint8)
    im = Image.fromarray(np.stack([ramp, ramp[::-1], ramp], -1))
    im = im.convert("L").convert("I;16") if mode == "I;16" else im.convert(mode)
    if mode == "RGBA":
        im.putalpha(Image.fromarray(ramp))
    buf = io.BytesIO()
    im.save(buf, fmt)
    data = buf.getvalue()
    del im, buf
    reset_peak_rss()
    base = peak_rss_kb()
    load_views(data, PREP, VIEWS)
    used = (peak_rss_kb() - base) * 1024
    assert used < PEAK_BYTES_PER_PIXEL * w * h, f"{used / (w * h):.1f} bytes per pixel"
