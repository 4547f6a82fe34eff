"""Atomic checkpoint writing for Lightning.

Lightning's default :class:`~lightning.pytorch.plugins.io.TorchCheckpointIO` serialises into memory and then
opens the destination for writing: a crash (OOM kill, pre-emption, full disk) during that write leaves a
truncated ``last.ckpt`` and the previous good one is already gone. :class:`AtomicCheckpointIO` writes to a
temporary file in the same folder (with the mode ``torch.save`` would give, ``0o666 & ~umask``), flushes and
fsyncs it, and moves it over the destination with :func:`os.replace` (atomic on POSIX and Windows within one
file system). A reader sees the old file or the new one, never a partial one. It reads checkpoints (resuming)
with ``weights_only=True`` unless told otherwise. ``samtune`` sets it as the Trainer's checkpoint IO by default.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from samtune.files import atomic_write

__all__ = ["AtomicCheckpointIO", "atomic_torch_save"]


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj, path)`` through a temporary file and :func:`os.replace`.

    Args:
        obj: anything ``torch.save`` accepts.
        path: destination file (its folder is created).

    Returns:
        The destination path.

    Raises:
        Whatever ``torch.save`` or the file system raises; the destination is then untouched and the temporary
        file removed.
    """
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`TorchCheckpointIO` whose ``save_checkpoint`` never leaves a partial file (local paths), and whose
    ``load_checkpoint`` reads with ``weights_only=True`` unless the caller explicitly passes False.

    Remote paths (``s3://``, ``gs://``, ...) fall back to Lightning's fsspec writer.
    """

    def load_checkpoint(self, path: str | Path, map_location: Any | None = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's loader with ``weights_only=True`` where it is not given (Lightning passes None when resuming,
        which leaves it to torch's default; the environment variable ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` turns
        that default off, and an untrusted checkpoint could then execute code)."""
        return super().load_checkpoint(path, map_location=map_location,
                                       weights_only=True if weights_only is None else weights_only)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                "AtomicCheckpointIO.save_checkpoint: storage_options are not supported, got "
                f"{storage_options!r}; write a custom CheckpointIO for them"
            )
        if "://" in str(path) and not str(path).startswith("file://"):
            super().save_checkpoint(checkpoint, path)
            return
        local = Path(str(path).removeprefix("file://"))
        atomic_torch_save(checkpoint, local)
