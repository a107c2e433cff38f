"""A disk cache of precomputed activations that can never be stale or half-written when used.

The lesson tells users to delete `tmp/` when they see weird errors; ours never need to. A cache
file is named by a key over everything the activations depend on: the architecture, the backbone's
actual weights (so training the backbone invalidates it), the evaluation preprocessing, and the
exact file list with each file's size and modification time. The file is written atomically and
carries a checksum of its tensor, so a damaged or truncated file is detected and recomputed.

The file records the key's parts as well as their digest, so that when it no longer fits it can
say why: the data changed (files added, removed or modified), the backbone's weights, the size or
preprocessing, or the view.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from serving.bundle.files import write_atomic
from serving.bundle.manifest import Preprocessing, TTAView
from trainer.config import Log

logger = logging.getLogger(__name__)

FORMAT = 1  # bump when the same key would describe other activations


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


@dataclass(frozen=True)
class CacheKey:
    """Everything a file of activations depends on: `spec`, JSON text of the parts, and `digest`,
    its sha256, which is what decides whether a cached file is used."""

    spec: str
    digest: str

    @property
    def parts(self) -> dict:
        return json.loads(self.spec)


def cache_key(arch: str, weights: str, prep: Preprocessing, view: TTAView, files: Sequence[Path]) -> CacheKey:
    spec = {
        "format": FORMAT,
        "arch": arch,
        "weights": weights,
        "prep": prep.model_dump(mode="json"),
        "view": view.model_dump(mode="json"),
        "files": files_fingerprint(files),
    }
    text = json.dumps(spec, sort_keys=True)
    return CacheKey(spec=text, digest=hashlib.sha256(text.encode()).hexdigest())


def what_changed(old: Mapping, new: Mapping) -> list[str]:
    """Why activations made for the key parts `old` do not fit `new`: one phrase per changed part."""
    reasons = []
    if old.get("format") != new.get("format"):
        reasons.append(f"cache format changed ({old.get('format')} -> {new.get('format')})")
    if old.get("arch") != new.get("arch"):
        reasons.append(f"architecture changed ({old.get('arch')} -> {new.get('arch')})")
    if old.get("weights") != new.get("weights"):
        reasons.append("backbone weights changed")
    if old.get("prep") != new.get("prep"):
        reasons.append(f"size/preprocessing changed ({_fields_changed(old.get('prep'), new.get('prep'))})")
    if old.get("view") != new.get("view"):
        reasons.append(f"view changed ({_fields_changed(old.get('view'), new.get('view'))})")
    if old.get("files") != new.get("files"):
        reasons.append(f"data changed ({_files_changed(old.get('files') or [], new.get('files') or [])})")
    return reasons


def _fields_changed(old: object, new: object) -> str:
    if not isinstance(old, dict) or not isinstance(new, dict):
        return f"{old} -> {new}"
    return ", ".join(f"{k} {old.get(k)} -> {new.get(k)}" for k in sorted({*old, *new}) if old.get(k) != new.get(k))


def _files_changed(old: list, new: list) -> str:
    """'2 added, e.g. /a.jpg; 1 modified, e.g. /b.jpg' for fingerprints [path, size, mtime_ns]."""
    before = {f[0]: tuple(f[1:]) for f in old}
    after = {f[0]: tuple(f[1:]) for f in new}
    groups = {
        "added": [p for p in after if p not in before],
        "removed": [p for p in before if p not in after],
        "modified": [p for p in after if p in before and before[p] != after[p]],
    }
    parts = [f"{len(paths)} {what}, e.g. {paths[0]}" for what, paths in groups.items() if paths]
    return "; ".join(parts) or "the same files in another order"


def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def load(path: Path, key: CacheKey, n: int, *, log: Log | None = None) -> torch.Tensor | None:
    """The cached activations, or None when the file is absent, for another key, or damaged.

    When a file exists but is not used, one line says why to `log` (default: a warning on this
    module's logger)."""
    say = log or logger.warning
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        features = blob["features"]
        intact = blob["sha256"] == _tensor_digest(features)
        same_key = blob["key"] == key.digest
    except Exception as e:  # truncated zip, unpickling error, missing field: all mean "recompute"
        say(f"precompute cache {path} is damaged ({e}): recomputing")
        return None
    if not intact or (same_key and features.shape[0] != n):
        say(f"precompute cache {path} is damaged (its activations fail their checksum or count): recomputing")
        return None
    if not same_key:
        say(f"precompute cache {path} is out of date: {_why(blob.get('spec'), key)}; recomputing")
        return None
    return features


def _why(old_spec: object, key: CacheKey) -> str:
    try:
        old = json.loads(old_spec) if isinstance(old_spec, str) else None
    except ValueError:
        old = None
    if not isinstance(old, dict):
        return "it does not record what it was made from (written by an older version)"
    return "; ".join(what_changed(old, key.parts)) or "its key differs"


def save(path: Path, key: CacheKey, features: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    features = features.detach().cpu().contiguous()
    buf = io.BytesIO()
    blob = {"key": key.digest, "spec": key.spec, "features": features, "sha256": _tensor_digest(features)}
    torch.save(blob, buf)
    write_atomic(path, buf.getvalue())


def cached(
    path: Path, key: CacheKey, n: int, compute: Callable[[], torch.Tensor], *, log: Log | None = None
) -> torch.Tensor:
    """Activations from `path` when valid for `key`, else computed and written there; `log` hears
    one line on why an existing file was not used (see `load`)."""
    features = load(path, key, n, log=log)
    if features is None:
        features = compute()
        save(path, key, features)
    return features
