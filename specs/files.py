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
import stat
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
            st = os.lstat(path)  # a symlink's target is not ours: its mode is not taken either
            mode = st.st_mode & 0o7777 if stat.S_ISREG(st.st_mode) else 0o666 & ~_umask()
        except FileNotFoundError:
            mode = 0o666 & ~_umask()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, mode)
        if keep_previous and os.path.lexists(path):
            previous = _keep(path, backup_path(path), directory)
        os.replace(tmp_name, path)  # replaces a symlink at `path` itself, never writes through it
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_directory(directory)
    return previous


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _keep(path: Path, previous: Path, directory: Path) -> Path | None:
    """Copy `path` to `previous` without following a symlink at either; where it was kept (None: `path` is
    neither a file nor a link, nothing to keep). The copy is written to a new temporary file (created
    exclusively) and renamed over `previous`, so a symlink planted there is replaced and its target untouched;
    a symlink at `path` is kept as the link it is, its target not read."""
    st = os.lstat(path)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        return None
    fd, tmp = tempfile.mkstemp(prefix=f".{previous.name}.", suffix=".tmp", dir=directory)
    try:
        if stat.S_ISLNK(st.st_mode):
            os.close(fd)
            os.unlink(tmp)
            os.symlink(os.readlink(path), tmp)  # fails, rather than follows, if anything took the name
        else:
            try:
                src = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except BaseException:
                os.close(fd)
                raise
            with os.fdopen(src, "rb") as source, os.fdopen(fd, "wb") as target:
                shutil.copyfileobj(source, target)
            shutil.copystat(path, tmp, follow_symlinks=False)
        os.replace(tmp, previous)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
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
