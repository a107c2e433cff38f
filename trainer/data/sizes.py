"""Image size statistics from file headers, to choose a resize target (the lesson's size histogram)."""

from __future__ import annotations

import io
import warnings
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from serving.bundle.files import write_atomic

PERCENTILES = (5, 25, 50, 75, 95)
# EXIF orientations 5-8 are quarter turns: the decoded (upright) image has width and height swapped.
_TRANSPOSED = {5, 6, 7, 8}


def header_size(path: Path) -> tuple[int, int]:
    """(width, height) of the upright image, as `serving.bundle.preprocess.decode_image` would return it,
    read from the header without decoding the pixels."""
    with warnings.catch_warnings():
        # Only the header is read, so a huge image costs nothing here.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            return upright_size(im)


def upright_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image once turned upright as its EXIF orientation says."""
    width, height = im.size
    # The base method reads only EXIF already parsed from the header; PNG's override would
    # decode the whole image to look for an EXIF chunk after the pixels.
    orientation = Image.Image.getexif(im).get(0x0112)
    return (height, width) if orientation in _TRANSPOSED else (width, height)


def _summary(values: list[int]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    out = {"min": int(a.min()), "median": float(np.median(a))}
    out.update({f"p{q}": float(np.percentile(a, q)) for q in PERCENTILES})
    out["max"] = int(a.max())
    return out


def image_size_stats(files: Iterable[Path | str]) -> dict:
    """Sizes of the images in `files`, from their headers only.

    Returns a dict: `count` (readable images); `width` and `height`, each {min, median, p5, p25,
    p50, p75, p95, max} in pixels, or None when no image was readable; `col_counts` and
    `row_counts`, {width: n} and {height: n} (columns and rows, as in the lesson); and `errors`, a
    list of (path, message) for files that could not be read. Unreadable files never raise.
    """
    widths, heights, errors = [], [], []
    for f in tqdm(list(files), desc="image sizes", unit="img", leave=False):
        try:
            w, h = header_size(Path(f))
        except (UnidentifiedImageError, Image.DecompressionBombError, SyntaxError, ValueError) as e:
            errors.append((Path(f), f"not a readable image: {e}"))
            continue
        except OSError as e:
            errors.append((Path(f), f"cannot read: {e.strerror or e}"))
            continue
        widths.append(w)
        heights.append(h)
    return {
        "count": len(widths),
        "width": _summary(widths) if widths else None,
        "height": _summary(heights) if heights else None,
        "col_counts": dict(sorted(Counter(widths).items())),
        "row_counts": dict(sorted(Counter(heights).items())),
        "errors": errors,
    }


def plot_size_histogram(stats_or_files: dict | Iterable[Path | str], out_png: Path | str, *, bins: int = 50) -> Path:
    """Write a PNG with histograms of image widths and heights, from `image_size_stats` output or
    from files (whose stats are computed first). Written atomically; the folder is created if needed.
    Raises ValueError when there is no readable image to plot."""
    # The Figure API with the Agg canvas needs no display and leaves pyplot's global state alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stats = stats_or_files if isinstance(stats_or_files, dict) else image_size_stats(stats_or_files)
    if not stats["count"]:
        raise ValueError(f"no readable images to plot ({len(stats['errors'])} unreadable); check the file list")
    out_png = Path(out_png)
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    for ax, name, counts in zip(
        fig.subplots(1, 2), ("width", "height"), (stats["col_counts"], stats["row_counts"]), strict=True
    ):
        sizes = np.asarray([int(k) for k in counts], dtype=np.float64)
        ax.hist(sizes, bins=bins, weights=list(counts.values()), color="tab:blue")
        summary = stats[name]
        ax.axvline(summary["median"], color="tab:orange", label=f"median {summary['median']:g} px")
        ax.set_xlabel(f"{name} (pixels)")
        ax.set_ylabel("images")
        ax.set_title(
            f"{name}: {summary['min']}-{summary['max']} px; 5-95%: {summary['p5']:.0f}-{summary['p95']:.0f} px"
        )
        ax.legend()
    fig.suptitle(f"{stats['count']} images")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out_png, buf.getvalue())
    return out_png
