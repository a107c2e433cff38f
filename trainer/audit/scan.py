"""Every image of a dataset read once, in parallel: whether training can use it, its upright size,
and the hashes that find its duplicates.

Each file is decoded in full, as training will decode it, so that a truncated JPEG is found here
rather than by a DataLoader worker halfway through precompute. JPEGs are decoded at a reduced scale
(Pillow's draft mode: the decoder still reads every byte of the compressed data, so truncation and
corruption are found, but skips most of the inverse DCT). On the 1,398 shared photos the check
took 1.2 s on 2 cores, as long as decoding them in full (bench/data_check.py: they are small, so
draft mode saves little there; it saves most on large photos). Memory is bounded by the worker
threads, one image each, at most `max_pixels` each."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from serving.bundle.cpus import usable_cpus
from serving.bundle.preprocess import ImageError, PixelLimitError, load_rgb, open_image
from trainer.data.sizes import upright_size

# The perceptual hash reads a 32 x 32 greyscale thumbnail: a JPEG is decoded at the smallest
# scale that leaves at least twice that, the rest at full size.
HASH_SIDE = 32
DRAFT_SIDE = 2 * HASH_SIDE
FLAT = 2.0  # grey levels: a thumbnail whose standard deviation is below this has no picture to compare


# The first 8 rows of the orthonormal DCT-II matrix of size HASH_SIDE: D @ x @ D.T is the 8 x 8
# lowest frequencies of scipy.fft.dctn(x, norm="ortho").
_K, _N = np.arange(8)[:, None], np.arange(HASH_SIDE)[None, :]
_DCT8 = np.sqrt(2 / HASH_SIDE) * np.cos(np.pi * (2 * _N + 1) * _K / (2 * HASH_SIDE))
_DCT8[0] /= np.sqrt(2)


@dataclass(frozen=True)
class Scan:
    """One file as the check found it: `problem` says in plain words why training cannot use it
    (None: it can); `width` and `height` are the upright image's; `digest` is the file's bytes'
    (exact duplicates) and `phash` its pixels' (near duplicates: resized, re-encoded)."""

    path: Path
    problem: str | None = None
    width: int = 0
    height: int = 0
    digest: str = ""
    phash: int | None = None


def scan_image(path: Path, max_pixels: int) -> Scan:
    """Read and decode one file; never raises for a bad file, whose Scan carries the problem."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return Scan(path, f"cannot read the file: {e.strerror or e}")
    if not data:
        return Scan(path, "empty file (0 bytes)")
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    try:
        im = open_image(data, max_pixels=max_pixels)
        width, height = upright_size(im)
        if im.format == "JPEG":
            im.draft("RGB", (DRAFT_SIDE, DRAFT_SIDE))
        rgb = load_rgb(im)
    except PixelLimitError as e:
        return Scan(path, f"{e}; --max-pixels {e.pixels} reads it, or downscale the file", digest=digest)
    except ImageError as e:
        return Scan(path, _explain(data, str(e)), digest=digest)
    return Scan(path, None, width, height, digest, phash(rgb))


def _explain(data: bytes, problem: str) -> str:
    """What a file that is no image is, when its first bytes say: scraped folders hold HTML error
    pages and text saved under an image's name."""
    if not problem.startswith("not a recognised image format"):
        return problem
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
        return "an HTML page, not an image (a download that failed?)"
    if all(32 <= b < 127 or b in b"\t\r\n" for b in data[:512]):
        return "a text file, not an image"
    return problem


def phash(im: Image.Image) -> int | None:
    """64-bit perceptual hash (the DCT hash of Zauner 2010, as the imagehash package computes it):
    the signs, against their median, of the 8 x 8 lowest frequencies of a 32 x 32 greyscale
    thumbnail. Resizing and re-encoding move a few bits at most; different photos differ in ~32.

    None for a flat image (one colour, or nearly): its frequencies are all about zero, so every
    flat image would hash alike whatever its colour; only its bytes can show a copy."""
    grey = np.asarray(im.convert("L").resize((HASH_SIDE, HASH_SIDE), Image.Resampling.LANCZOS), dtype=np.float64)
    if grey.std() < FLAT:
        return None
    low = _DCT8 @ grey @ _DCT8.T
    bits = np.packbits((low > np.median(low)).ravel())
    return int.from_bytes(bits.tobytes(), "big")


def scan_images(files: Sequence[Path], *, max_pixels: int, workers: int | None = None) -> list[Scan]:
    """scan_image for every file, in order, on `workers` threads (default: the usable CPUs, at
    most 8; Pillow decodes without the GIL), with a progress bar."""
    workers = workers or min(8, usable_cpus())
    with ThreadPoolExecutor(max_workers=workers) as pool:
        jobs = pool.map(lambda f: scan_image(Path(f), max_pixels), files)
        return list(tqdm(jobs, total=len(files), desc="check images", unit="img", leave=False))
