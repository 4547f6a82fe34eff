"""Files written for users: the mode a new file gets, and atomic writes through a temporary file beside the target.

:func:`atomic_write` is the one way samtune writes a file a user keeps (checkpoints, exports, adapter files, cache
entries, reports): a unique temporary file in the target's folder (so concurrent writers of one path never share
it), fsync, :func:`os.replace`, fsync of the folder. A reader sees the old file or the new one, never a part.

``tempfile.mkstemp`` (and safetensors' ``save_file``) create private ``0o600`` files and ``os.replace`` keeps that
mode, so a checkpoint written atomically would be unreadable to the other users of a shared cluster or group.
These helpers give such files the mode ``torch.save`` / ``open()`` would give (``0o666 & ~umask``). No
dependencies: used by the core (``samtune.checkpoint_io``), ``samtune.adapt`` and ``samtune.export``.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["atomic_write", "fsync_dir", "new_dir_mode", "new_file_mode", "set_new_file_mode"]


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file: ``0o666`` less the process umask (0o644 under umask 022)."""
    return 0o666 & ~_umask()


def new_dir_mode() -> int:
    """The mode ``os.mkdir`` gives a new folder: ``0o777`` less the process umask (0o755 under umask 022)."""
    return 0o777 & ~_umask()


def _umask() -> int:
    """The process umask, read from ``/proc/self/status`` where possible; elsewhere it is set and restored at once
    (to 0o077 in between, so that a file another thread creates meanwhile is not more open than intended)."""
    mask = None
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    mask = int(line.split()[1], 8)
                    break
    except (OSError, ValueError, IndexError):
        mask = None
    if mask is None:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def set_new_file_mode(target: int | str | os.PathLike) -> None:
    """Give a file (descriptor or path) the mode ``open()`` gives a new file (:func:`new_file_mode`).

    For the temporary file of an atomic write: ``tempfile.mkstemp`` (and safetensors' ``save_file``) create
    private 0o600 files, and ``os.replace`` keeps that mode, so other users of a shared cluster could not read or
    resume from the checkpoint. Nothing happens where the file system refuses ``chmod``.
    """
    try:
        if isinstance(target, int):
            os.fchmod(target, new_file_mode())
        else:
            os.chmod(target, new_file_mode())
    except (OSError, AttributeError):  # AttributeError: no os.fchmod (Windows before Python 3.13)
        pass


def fsync_dir(directory: str | os.PathLike) -> None:
    """Persist a rename in ``directory`` (no-op where directories cannot be opened, e.g. Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Create or replace ``path`` atomically: ``write(tmp)`` fills a unique temporary file beside it.

    Args:
        path: the destination (its folder is created).
        write: writes the whole file to the path it is given (e.g. ``lambda tmp: torch.save(obj, tmp)``); it may
            replace the file (safetensors does).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        Whatever ``write`` or the file system raises; the destination is then untouched and the temporary file
        removed. The new file gets the mode ``open()`` would give it (:func:`new_file_mode`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        set_new_file_mode(tmp)  # mkstemp (and safetensors' save_file, which recreates the file) make it 0o600
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
    return path
