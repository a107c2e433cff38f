"""A disk cache of the images with their shorter side reduced to a target (the lesson's `data.resize`).

Large photos (Kaggle's dog breeds are up to 3000 px) spend most of each epoch being decoded and
shrunk; the lesson resizes them once to 340 px and trains on the copies. Ours is a cache that cannot
be stale or half-written when used: every file is written atomically, and an index beside the files
records, for each one, the source's size and mtime (ns) and the cached file's own size and mtime.
A file is reused only when both still match, so a changed source is re-made, and a truncated,
replaced or deleted cache file is too. The index is rewritten atomically every few seconds and at
the end; an entry is only added after its file is complete, so an interrupted run loses at most
the work since the last index write and never leaves a file that looks valid but is not.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from serving.files import write_atomic
from serving.preprocess import ImageError, decode_image, resize_shorter
from trainer.data import DataError, ImageClassifierData

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the cached bytes for the same source and settings would change
INDEX_NAME = ".resize-index.json"
JPEG_QUALITY = 95  # also used for WebP; high enough that re-encoding is invisible to the model
INDEX_EVERY_S = 2.0  # how much work an interrupted run may lose, in seconds


def resize_images(
    data: ImageClassifierData, target: int, tmp_name: str = "tmp", *, workers: int | None = None
) -> ImageClassifierData:
    """A copy of `data` whose training, validation and test files are the cached resized images.

    Each image `data.path/<rel>` is cached at `data.path/tmp_name/<target>/<rel>`: its shorter side
    reduced to `target` pixels with `serving.preprocess.resize_shorter` (the data's interpolation)
    after EXIF-aware decoding, and encoded in the format its extension names (JPEG and WebP at
    quality 95). Images whose shorter side is already `target` or less are copied byte for byte:
    never upscaled. Up-to-date cache files are reused; see the module docstring for what that means.
    Labels, classes, transforms and `path` are unchanged, so models and other caches stay where
    they were. `workers` threads decode and encode (default: the CPU count, at most 8).

    Raises DataError when a file lies outside `data.path`, or, after caching every other image,
    when some sources could not be read or decoded (naming them).
    """
    if isinstance(target, bool) or not isinstance(target, int) or target < 1:
        raise ValueError(f"target must be a positive number of pixels, got {target!r}")
    src_root = Path(data.path)
    root = src_root / tmp_name / str(target)
    settings = {
        "format": FORMAT,
        "target": target,
        "interpolation": data.tfms.prep.interpolation,
        "jpeg_quality": JPEG_QUALITY,
    }
    sources = list(dict.fromkeys([*data.trn_files, *data.val_files, *(data.test_files or [])]))
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
            jobs = pool.map(lambda f: _cache_one(Path(f), cached[f], target, settings["interpolation"]), todo)
            bar = tqdm(jobs, total=len(todo), desc=f"resize to {target}px", unit="img", leave=False)
            for f, (entry, error) in zip(todo, bar, strict=True):
                if error is not None:
                    failed.append((Path(f), error))
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
        raise DataError(
            f"{len(failed)} of {len(sources)} images could not be resized ({shown}); "
            f"remove or replace them and run again (the other {len(sources) - len(failed)} are cached under {root})"
        )

    def moved(files):
        return None if files is None else [cached[f] for f in files]

    return dataclasses.replace(
        data, trn_files=moved(data.trn_files), val_files=moved(data.val_files), test_files=moved(data.test_files)
    )


def _relative(f: Path, root: Path) -> str:
    # Lexically first, so that a symlink under the data folder keeps its place in the cache.
    for a, b in ((f, root), (f.resolve(), root.resolve())):
        try:
            return a.relative_to(b).as_posix()
        except ValueError:
            pass
    raise DataError(
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


def _up_to_date(src: Path, dst: Path, entry) -> bool:
    if not isinstance(entry, dict):
        return False
    try:
        return entry.get("source") == _stamp(src.stat()) and entry.get("cache") == _stamp(dst.stat())
    except OSError:
        return False


def _cache_one(src: Path, dst: Path, target: int, interpolation: str) -> tuple[dict | None, str | None]:
    """Write the cached copy of one image: (index entry, None), or (None, why) for a bad source."""
    try:
        # Stat before reading: a source changed while we read it then looks newer than its entry.
        source_stamp = _stamp(src.stat())
        raw = src.read_bytes()
        im = decode_image(raw)
    except ImageError as e:
        return None, str(e)
    except OSError as e:
        return None, f"cannot read: {e.strerror or e}"
    out = raw if min(im.size) <= target else _encode(resize_shorter(im, target, interpolation), _format(src, raw))
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(dst, out)
    return {"source": source_stamp, "cache": _stamp(dst.stat())}, None


def _format(path: Path, raw: bytes) -> str:
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:  # an id without an extension: keep whatever the file really is
        with Image.open(io.BytesIO(raw)) as im:
            fmt = im.format
    return fmt


def _encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    options = {"quality": JPEG_QUALITY} if fmt in ("JPEG", "WEBP") else {}
    im.save(buf, format=fmt, **options)
    return buf.getvalue()
