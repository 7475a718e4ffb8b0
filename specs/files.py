"""Atomic file writes that keep the previous version.

Every file homelab writes (a spec it edits, the gateway config, state) goes
through `atomic_write`: the new text goes to a temporary file in the same
directory, is flushed to disk, and is renamed over the target, so a reader
sees the old file or the new one, never half of one. The previous version is
kept beside it as `NAME.bak`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def backup_path(path: Path) -> Path:
    return path.with_name(path.name + ".bak")


def atomic_write(path: Path, data: str | bytes, *, keep_previous: bool = True, mode: int | None = None) -> Path | None:
    """Write `data` to `path` atomically; return where the previous version was kept, if any.

    `mode` sets the new file's permissions; by default an existing file's mode is kept
    (0o644 for a new one, less the umask).
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    payload = data.encode("utf-8") if isinstance(data, str) else data
    previous: Path | None = None
    if mode is None:
        try:
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, mode)
        if keep_previous and path.exists():
            previous = backup_path(path)
            shutil.copy2(path, previous)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_directory(directory)
    return previous


def _fsync_directory(directory: Path) -> None:
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(dir_fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(dir_fd)
