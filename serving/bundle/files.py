"""File helpers shared by the trainer and the server: atomic writes with normal permissions, and
content digests. Kept apart from the bundle schema, which is the contract and nothing else."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half of one.

    The file gets the mode a plain open() would give it (0644 under umask 022), not mkstemp's 0600:
    a server running as another user than the trainer, the usual case in containers, must read it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A new folder in `parent` with the mode mkdir would give it (0755 under umask 022), not mkdtemp's 0700."""
    folder = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    folder.chmod(0o777 & ~umask())
    return folder


def umask() -> int:
    """The process's umask. Linux reports it in /proc; elsewhere it is read by setting it, which is
    briefly process-wide, so it is set straight back to what it was."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
