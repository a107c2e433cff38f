"""The embedded default dataset: scikit-learn's handwritten digits as image files, lesson layout."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from serving.bundle.files import write_atomic
from trainer.data.loaders import get_cv_idxs

# The 8x8 originals are upscaled so that the files look like digits to a person opening them.
FILE_SIZE = 32


def materialise_digits(root: Path | str, *, val_pct: float = 0.2, seed: int = 42) -> Path:
    """Write the 1,797 digits as PNGs under root/train/<digit>/ and root/valid/<digit>/.

    Idempotent: a folder that already holds the complete set is left as it is. Files are written
    atomically, so an interrupted run leaves no half-written image."""
    from sklearn.datasets import load_digits

    root = Path(root)
    digits = load_digits()
    val = set(get_cv_idxs(len(digits.images), val_pct, seed).tolist())
    marker = root / ".complete"
    if marker.is_file():
        return root
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        split = "valid" if i in val else "train"
        folder = root / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        a = np.round(pixels * (255.0 / 16.0)).astype(np.uint8)  # 0-16 ink levels -> 0-255
        im = Image.fromarray(a, mode="L").resize((FILE_SIZE, FILE_SIZE), Image.Resampling.BICUBIC)
        path = folder / f"{i:04d}.png"
        if not path.exists():
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            write_atomic(path, buf.getvalue())
    write_atomic(marker, b"")
    return root
