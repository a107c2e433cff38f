"""Where a run's derived files go for a dataset: beside the data, or in the user's cache when it is read-only."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def default_work_dir(data_path: Path) -> Path:
    """Where models/ and tmp/ go: beside the data as in the lesson, or, when the data folder is
    read-only (a shared dataset), a per-dataset folder in the user's cache.

    Read-only means either: this user may not write there, or the folder's mode grants nobody
    write access. The second matters for root, whom os.access always lets write."""
    data_path = Path(data_path).resolve()
    if os.access(data_path, os.W_OK) and data_path.stat().st_mode & 0o222:
        return data_path
    digest = hashlib.sha256(str(data_path).encode()).hexdigest()[:12]
    return (
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "lesson2-classifier"
        / f"{data_path.name}-{digest}"
    )
