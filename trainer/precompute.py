"""A disk cache of precomputed activations that can never be stale or half-written when used.

The lesson tells users to delete `tmp/` when they see weird errors; ours never need to. A cache
file is named by a key over everything the activations depend on: the architecture, the backbone's
actual weights (so training the backbone invalidates it), the evaluation preprocessing, and the
exact file list with each file's size and modification time. The file is written atomically and
carries a checksum of its tensor, so a damaged or truncated file is detected and recomputed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from serving.bundle import Preprocessing, TTAView
from serving.files import write_atomic

log = logging.getLogger(__name__)

FORMAT = 1


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over a module's parameters and buffers, in state-dict order."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def files_fingerprint(files: Sequence[Path]) -> list[tuple[str, int, int]]:
    """(absolute path, size in bytes, mtime in ns) of every file, in order."""
    out = []
    for f in files:
        st = Path(f).stat()
        out.append((str(Path(f).resolve()), st.st_size, st.st_mtime_ns))
    return out


def cache_key(arch: str, weights: str, prep: Preprocessing, view: TTAView, files: Sequence[Path]) -> str:
    spec = {
        "format": FORMAT,
        "arch": arch,
        "weights": weights,
        "prep": prep.model_dump(mode="json"),
        "view": view.model_dump(mode="json"),
        "files": files_fingerprint(files),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def load(path: Path, key: str, n: int) -> torch.Tensor | None:
    """The cached activations, or None when the file is absent, for another key, or damaged."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        features = blob["features"]
        ok = blob["key"] == key and features.shape[0] == n and blob["sha256"] == _tensor_digest(features)
    except Exception as e:  # truncated zip, unpickling error, missing field: all mean "recompute"
        log.warning("precompute cache %s is damaged (%s): recomputing", path, e)
        return None
    if not ok:
        log.warning("precompute cache %s does not match its data: recomputing", path)
        return None
    return features


def save(path: Path, key: str, features: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    features = features.detach().cpu().contiguous()
    buf = io.BytesIO()
    torch.save({"key": key, "features": features, "sha256": _tensor_digest(features)}, buf)
    write_atomic(path, buf.getvalue())


def cached(path: Path, key: str, n: int, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Activations from `path` when valid for `key`, else computed and written there."""
    features = load(path, key, n)
    if features is None:
        features = compute()
        save(path, key, features)
    return features
