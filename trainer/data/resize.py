"""A disk cache of the images with their shorter side reduced to a target (the lesson's `data.resize`).

Large photos (Kaggle's dog breeds are up to 3000 px) spend most of each epoch being decoded and
shrunk; the lesson resizes them once to 340 px and trains on the copies. Ours is a cache that cannot
be stale or half-written when used: every file is written atomically, and an index beside the files
records, for each one, the source's size and mtime (ns) and the cached file's own size and mtime.
A file is reused only when both still match, so a changed source is re-made, and a truncated,
replaced or deleted cache file is too. The index is rewritten atomically every few seconds and at
the end; an entry is only added after its file is complete, so an interrupted run loses at most
the work since the last index write and never leaves a file that looks valid but is not.

The cache lives in the dataset's work folder (`trainer.data.workdir`): `tmp/<target>/` beside the images,
or under the user's cache when the data folder is read-only, so a shared dataset is never written to.
It works on paths alone; `ImageClassifierData.resize` maps a dataset's files through it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from serving.bundle.files import write_atomic
from serving.bundle.preprocess import ImageError, decode_image, resize_shorter
from trainer.config import MAX_TRAIN_PIXELS
from trainer.data.workdir import default_work_dir

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the cached bytes for the same source and settings would change
INDEX_NAME = ".resize-index.json"
JPEG_QUALITY = 95  # also used for WebP; high enough that re-encoding is invisible to the model
INDEX_EVERY_S = 2.0  # how much work an interrupted run may lose, in seconds


class ResizeError(ValueError):
    """Images that cannot be cached; the message names them and what to do."""


def cache_dir(data_path: Path, target: int, tmp_name: str = "tmp") -> Path:
    """The folder of the copies at `target` pixels of the dataset at `data_path`: `tmp_name/<target>`
    in its work folder, which is the data folder itself or, when that is read-only, a folder in the
    user's cache (`trainer.data.workdir.default_work_dir`, where the precompute cache goes too)."""
    return default_work_dir(data_path) / tmp_name / str(target)


def resize_images(
    files: Sequence[Path],
    data_path: Path,
    target: int,
    *,
    tmp_name: str = "tmp",
    interpolation: str = "bilinear",
    workers: int | None = None,
    max_pixels: int = MAX_TRAIN_PIXELS,
) -> dict[Path, Path]:
    """The cached copy of each of `files`, keyed by the path as given, made where missing or stale.

    Each image `data_path/<rel>` is cached at `cache_dir(data_path, target, tmp_name)/<rel>`: its
    shorter side reduced to `target` pixels with `serving.bundle.preprocess.resize_shorter` (with
    `interpolation`, the data's) after EXIF-aware decoding, and encoded in the format its extension
    names (JPEG and WebP at quality 95). Images whose shorter side is already `target` or less are
    copied byte for byte: never upscaled. Up-to-date cache files are reused; see the module
    docstring for what that means. `workers` threads decode and encode (default: the CPU count, at
    most 8). Images over `max_pixels` are not read (trainer.config.MAX_TRAIN_PIXELS).

    Raises ResizeError when a file lies outside `data_path`, or, after caching every other image,
    when some sources could not be read or decoded (naming them).
    """
    if isinstance(target, bool) or not isinstance(target, int) or target < 1:
        raise ValueError(f"target must be a positive number of pixels, got {target!r}")
    src_root = Path(data_path)
    root = cache_dir(src_root, target, tmp_name)
    settings = {
        "format": FORMAT,
        "target": target,
        "interpolation": interpolation,
        "jpeg_quality": JPEG_QUALITY,
    }
    sources = list(dict.fromkeys(files))
    rel = {f: _relative(Path(f), src_root) for f in sources}
    cached = {f: root / rel[f] for f in sources}

    index_path = root / INDEX_NAME
    entries = _read_index(index_path, settings)
    todo = [f for f in sources if not _up_to_date(Path(f), cached[f], entries.get(rel[f]))]
    failed: list[tuple[Path, str]] = []
    if todo:
        root.mkdir(parents=True, exist_ok=True)
        workers = workers or min(8, os.cpu_count() or 1)
        pool = ThreadPoolExecutor(max_workers=workers)
        last_write = time.monotonic()
        try:
            jobs = pool.map(lambda f: _cache_one(Path(f), cached[f], target, interpolation, max_pixels), todo)
            bar = tqdm(jobs, total=len(todo), desc=f"resize to {target}px", unit="img", leave=False)
            for f, entry in zip(todo, bar, strict=True):
                if isinstance(entry, str):
                    failed.append((Path(f), entry))
                    entries.pop(rel[f], None)
                    continue
                entries[rel[f]] = entry
                if time.monotonic() - last_write > INDEX_EVERY_S:
                    _write_index(index_path, settings, entries)
                    last_write = time.monotonic()
        finally:
            # On an error or Ctrl-C, drop the queued images rather than resize them unrecorded.
            pool.shutdown(wait=True, cancel_futures=True)
            _write_index(index_path, settings, entries)
        log.info("resize to %dpx: made %d of %d images under %s", target, len(todo) - len(failed), len(sources), root)
    if failed:
        shown = "; ".join(f"{f}: {e}" for f, e in failed[:5]) + ("; ..." if len(failed) > 5 else "")
        raise ResizeError(
            f"{len(failed)} of {len(sources)} images could not be resized ({shown}); "
            f"remove or replace them and run again (the other {len(sources) - len(failed)} are cached under {root})"
        )
    return cached


def _relative(f: Path, root: Path) -> str:
    # Lexically first, so that a symlink under the data folder keeps its place in the cache.
    for a, b in ((f, root), (f.resolve(), root.resolve())):
        try:
            return a.relative_to(b).as_posix()
        except ValueError:
            pass
    raise ResizeError(
        f"{f}: not under the data folder {root}; the resize cache mirrors paths relative to it, "
        "so keep every image of the dataset under `path`"
    )


def _read_index(path: Path, settings: dict) -> dict[str, dict]:
    """The index's entries, or none when it is absent, unreadable or made with other settings."""
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # truncated or garbled JSON, bad UTF-8
        log.warning("resize cache index %s is damaged (%s): re-making its images", path, e)
        return {}
    if (
        not isinstance(raw, dict)
        or not isinstance(raw.get("files"), dict)
        or any(raw.get(k) != v for k, v in settings.items())
    ):
        log.warning("resize cache index %s was made with other settings: re-making its images", path)
        return {}
    return raw["files"]


def _write_index(path: Path, settings: dict, entries: dict[str, dict]) -> None:
    write_atomic(path, json.dumps({**settings, "files": entries}, sort_keys=True).encode())


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns]


def _up_to_date(src: Path, dst: Path, entry: object) -> bool:
    if not isinstance(entry, dict):
        return False
    try:
        return entry.get("source") == _stamp(src.stat()) and entry.get("cache") == _stamp(dst.stat())
    except OSError:
        return False


def _cache_one(src: Path, dst: Path, target: int, interpolation: str, max_pixels: int) -> dict | str:
    """Write the cached copy of one image: its index entry, or why not for a bad source."""
    try:
        # Stat before reading: a source changed while we read it then looks newer than its entry.
        source_stamp = _stamp(src.stat())
        raw = src.read_bytes()
        im = decode_image(raw, max_pixels=max_pixels)
    except ImageError as e:
        return str(e)
    except OSError as e:
        return f"cannot read: {e.strerror or e}"
    out = raw if min(im.size) <= target else _encode(resize_shorter(im, target, interpolation), _format(src, raw))
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(dst, out)
    return {"source": source_stamp, "cache": _stamp(dst.stat())}


def _format(path: Path, raw: bytes) -> str:
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:  # an id without an extension: keep whatever the file really is
        with Image.open(io.BytesIO(raw)) as im:
            fmt = im.format
    return fmt or "PNG"  # a decodable image of no format Pillow names: lossless, to change nothing


def _encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    options = {"quality": JPEG_QUALITY} if fmt in ("JPEG", "WEBP") else {}
    im.save(buf, format=fmt, **options)
    return buf.getvalue()
