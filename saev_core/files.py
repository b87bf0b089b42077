"""Paths, URLs and atomic writes: the one place that decides what a complete file on disk is.

Every file a user may read while a run is going (checkpoints, state files, tables, plots, weights) is written to a
temporary file in the same folder, flushed and fsynced, renamed over the target, and the folder is fsynced: a
killed run leaves the old file or the new one, never half of one, and a power loss does not lose the rename.
"""

import contextlib
import json
import os
import tempfile
import threading
from collections.abc import Callable
from typing import BinaryIO


def is_url(path: str) -> bool:
    """Whether ``path`` is an fsspec URL (``s3://``, ``memory://``...) rather than a local path."""
    return "://" in str(path)


def join(root: str, name: str) -> str:
    """``root/name`` for a local folder or a URL."""
    return root.rstrip("/") + "/" + name if is_url(root) else os.path.join(root, name)


def absolute(path: str) -> str:
    """A local path made absolute (so it works from any folder and any Dagster run worker); URLs unchanged."""
    return path if is_url(path) else os.path.abspath(path)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> str:
    """Call ``write(f)`` on a temporary binary file beside ``path``, fsync it, rename it over ``path`` and fsync the
    folder. Creates the folder. Returns the absolute path."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + "-", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; the output gets the user's usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove_if_exists(tmp)
        raise
    fsync_folder(folder)
    return path


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask (reading it means setting it: done under a lock and restored at once)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> str:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike, obj) -> str:
    """Indented JSON (values that are not JSON written as strings), atomically."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=1, default=str) + "\n").encode())


def read_json(path: str | os.PathLike):
    """The parsed file, or None when it does not exist."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def fsync_folder(folder: str) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_if_exists(path: str | os.PathLike) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
