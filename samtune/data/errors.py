"""Bad-input handling shared by all datasets: :class:`SampleError` and the cross-process skip counter."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch

logger = logging.getLogger("samtune.data")

OnError = Literal["raise", "skip"]

_MAX_SLOTS = 1025  # slot 0: main process; slot i + 1: DataLoader worker i


class SampleError(RuntimeError):
    """A sample cannot be used: the message names the file and the problem.

    Args:
        path: the offending file (image, mask or annotation file).
        problem: what is wrong and what was expected; None when ``path`` already is the whole message.
    """

    def __init__(self, path: str | Path, problem: str | None = None) -> None:
        # One argument is a complete message: torch's DataLoader re-raises worker errors as ``type(exc)(message)``.
        self.path = str(path)
        self.problem = problem
        super().__init__(self.path if problem is None else f"{self.path}: {problem}")

    def __reduce__(self):  # survive pickling between processes intact
        return (SampleError, (self.path, self.problem))


class SkipCounter:
    """Counts skipped samples across DataLoader worker processes.

    Each process writes only its own slot of a shared-memory tensor (no lost updates, no lock), so the main
    process can read the total at any time, e.g. from a LightningModule's ``on_train_epoch_end``.
    """

    def __init__(self) -> None:
        self._counts = torch.zeros(_MAX_SLOTS, dtype=torch.int64).share_memory_()

    def increment(self) -> int:
        """Add one skip for the calling process and return the running total."""
        info = torch.utils.data.get_worker_info()
        slot = 0 if info is None else (info.id % (_MAX_SLOTS - 1)) + 1
        self._counts[slot] += 1
        return self.total

    @property
    def total(self) -> int:
        """Number of samples skipped so far, over all processes."""
        return int(self._counts.sum())

    def reset(self) -> None:
        """Set the count back to zero (e.g. at the start of an epoch)."""
        self._counts.zero_()
