"""A model repository on disk, laid out as Triton lays one out: `<root>/<model>/<version>/`, one
bundle per version, the version a positive integer. Pure file-system work, no ONNX Runtime.

This module owns the layout: the scanner that reads it, the version policies that pick what is
served, and `publish`, which puts a finished bundle in as the next version. Entries whose names
start with '.' are invisible here: a version still being written lives in such a folder until it is
renamed into place, so a scan never sees half of one.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("serving.repository.layout")

LATEST = "latest"
# (file name, size in bytes, mtime in ns) of every file of a version folder, sorted.
Fingerprint = tuple[tuple[str, int, int], ...]


class RepositoryError(ValueError):
    """A repository or version policy that cannot be used; the message says what to change."""


@dataclass(frozen=True)
class VersionDir:
    """One version folder as a scan saw it. Two scans of unchanged files give equal fingerprints, so
    a version refused once (say, half copied) is tried again only when its files change."""

    model: str
    version: int
    path: Path
    fingerprint: Fingerprint


def fingerprint(folder: Path) -> Fingerprint:
    entries = []
    with os.scandir(folder) as it:
        for e in it:
            if e.is_file():
                st = e.stat()
                entries.append((e.name, st.st_size, st.st_mtime_ns))
    return tuple(sorted(entries))


def changed_files(before: Fingerprint, after: Fingerprint) -> list[str]:
    """Names of the files added, removed or changed (size or mtime) between two fingerprints of a folder."""
    old, new = {name: rest for name, *rest in before}, {name: rest for name, *rest in after}
    return sorted(name for name in old.keys() | new.keys() if old.get(name) != new.get(name))


def _version_number(name: str) -> int | None:
    return int(name) if name.isascii() and name.isdigit() and int(name) > 0 else None


class Scanner:
    """`scan()` reads the repository; names it ignores (not a positive integer) are logged once."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self._ignored: set[Path] = set()

    def scan(self) -> dict[str, dict[int, VersionDir]]:
        """{model: {version: VersionDir}}; hidden entries and files are skipped, and so are models with no
        version. Raises RepositoryError when the root itself is missing."""
        if not self.root.is_dir():
            raise RepositoryError(f"{self.root}: no such model repository; it holds <model>/<version>/ bundle folders")
        found: dict[str, dict[int, VersionDir]] = {}
        for model_dir in sorted(self.root.iterdir()):
            if model_dir.name.startswith(".") or not model_dir.is_dir():
                continue
            versions: dict[int, VersionDir] = {}
            for version_dir in sorted(model_dir.iterdir()):
                if version_dir.name.startswith(".") or not version_dir.is_dir():
                    continue
                number = _version_number(version_dir.name)
                if number is None:
                    if version_dir not in self._ignored:
                        self._ignored.add(version_dir)
                        log.warning("%s: ignored: a version folder's name is a positive integer", version_dir)
                    continue
                try:
                    fp = fingerprint(version_dir)
                except OSError:  # removed while we looked
                    continue
                versions[number] = VersionDir(model_dir.name, number, version_dir, fp)
            if versions:
                found[model_dir.name] = versions
        return found


def parse_policies(text: str | Mapping[str, str | int] | None) -> dict[str, int | None]:
    """`classifier=3,other=latest` -> {"classifier": 3, "other": None}; None means the latest version.
    Models not named get the latest."""
    if text is None:
        return {}
    items = text.items() if isinstance(text, Mapping) else (p.partition("=")[::2] for p in text.split(",") if p.strip())
    policies: dict[str, int | None] = {}
    for name, value in items:
        name, value = str(name).strip(), str(value).strip()
        number = _version_number(value)
        if not name or (value != LATEST and number is None):
            raise RepositoryError(
                f"version policy {name}={value!r}: write MODEL=latest or MODEL=N with N a positive version number, "
                "comma-separated for several models"
            )
        policies[name] = number
    return policies


def wanted(
    scan: Mapping[str, Mapping[int, VersionDir]],
    policies: Mapping[str, int | None],
    refused: Collection[VersionDir] = (),
) -> dict[str, VersionDir]:
    """The version each model should serve: its pinned one (when on disk), else its latest that was not
    `refused` (a broken newest version leaves the one before it served). A model with nothing to serve
    is left out."""
    out: dict[str, VersionDir] = {}
    for model, versions in scan.items():
        pin = policies.get(model)
        if pin is not None:
            if pin in versions and versions[pin] not in refused:
                out[model] = versions[pin]
            continue
        usable = [v for n, v in sorted(versions.items()) if v not in refused]
        if usable:
            out[model] = usable[-1]
    return out


def next_version(model_dir: Path) -> int:
    """1 + the largest version number in `model_dir` (1 when there is none)."""
    if not model_dir.is_dir():
        return 1
    numbers = [n for p in model_dir.iterdir() if (n := _version_number(p.name)) is not None]
    return max(numbers, default=0) + 1


def staging_dir(root: Path | str, model: str) -> Path:
    """A hidden folder path inside `<root>/<model>/` to write a new version into; `publish` moves it in."""
    model_dir = Path(root) / model
    model_dir.mkdir(parents=True, exist_ok=True)
    return model_dir / f".staging-{os.getpid()}-{os.urandom(4).hex()}"


def publish(staged: Path, *, attempts: int = 100) -> Path:
    """Rename a finished, hidden version folder into place as the next version number of its model, in
    one rename, so that a scan sees all of it or none. When another export took that number meanwhile
    the rename fails (the target is not empty), and the number after is tried."""
    model_dir = staged.parent
    number = 0
    for _ in range(attempts):
        number = max(number + 1, next_version(model_dir))
        target = model_dir / str(number)
        if target.exists():  # rename() would replace an empty folder silently
            continue
        try:
            os.rename(staged, target)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                continue
            raise
        return target
    raise RepositoryError(f"{model_dir}: could not take a version number after {attempts} tries")
