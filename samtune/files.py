"""Files written for users: the mode a new file gets, and atomic writes through a temporary file beside the target.

``tempfile.mkstemp`` (and safetensors' ``save_file``) create private ``0o600`` files and ``os.replace`` keeps that
mode, so a checkpoint written atomically would be unreadable to the other users of a shared cluster or group.
These helpers give such files the mode ``torch.save`` / ``open()`` would give (``0o666 & ~umask``). No
dependencies: used by the core (``samtune.checkpoint_io``), ``samtune.adapt`` and ``samtune.export``.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["mkstemp_beside", "new_file_mode", "set_new_file_mode"]


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file: ``0o666`` less the process umask (0o644 under umask 022).

    The umask is read from ``/proc/self/status`` where possible; elsewhere it is set and restored at once
    (to 0o077 in between, so that a file another thread creates meanwhile is not more open than intended).
    """
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
    return 0o666 & ~mask


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


def mkstemp_beside(path: Path) -> tuple[int, Path]:
    """``tempfile.mkstemp`` in ``path``'s folder for an atomic write of ``path``: (open descriptor, temp path),
    with the mode ``torch.save`` would give (:func:`set_new_file_mode`) instead of mkstemp's 0o600."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    set_new_file_mode(fd)
    return fd, Path(tmp_name)
