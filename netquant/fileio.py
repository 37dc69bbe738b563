"""Atomic file writes: a file netquant writes is, at every moment, either the old file or the
complete new one, whatever happens (SIGKILL, Ctrl-C, a full disk).

The bytes go to a temporary file in the same folder (the same file system, so the final rename
cannot become a copy), are flushed and fsync'd, and the temporary file is renamed over the target
with :func:`os.replace`, which POSIX makes atomic. On any error the temporary file is removed
and the target is untouched.

    with atomic_write("quantizer.nq", "wb") as f:
        f.write(data)
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb", encoding: str | None = None):
    """Open a temporary file beside ``path`` for writing (``mode`` "wb" or "w"); on a clean exit
    it replaces ``path`` atomically, on an exception it is deleted and ``path`` keeps its old
    content. Yields the open file object."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        from .errors import OutputPathError

        raise OutputPathError(f"{path}: cannot write, the folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=folder)
    try:
        with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if path.exists():   # keep the permissions of the file being replaced
            with contextlib.suppress(OSError):
                os.chmod(tmp, path.stat().st_mode & 0o7777)
        else:               # mkstemp makes 0600; a new file gets the usual umask-derived mode
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):   # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _umask() -> int:
    """The process umask, read without changing it where Linux tells it (os.umask sets it, which
    would race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes(path, data: bytes) -> None:
    """``Path(path).write_bytes(data)``, atomically."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_text(path, text: str, encoding: str = "utf-8") -> None:
    """``Path(path).write_text(text)``, atomically."""
    with atomic_write(path, "w", encoding=encoding) as f:
        f.write(text)
