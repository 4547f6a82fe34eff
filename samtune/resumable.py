"""Resumable training: data order, sample randomness and the global random generators.

A plain ``DataLoader(shuffle=True)`` draws each epoch's permutation from the global RNG, so a run restarted from
a checkpoint sees a different order than the run it continues, and a mid-epoch restart replays images the run
already saw. :func:`make_resumable` rebuilds a shuffling training loader around :class:`ResumableSampler`:

- the permutation of epoch ``e`` is a fixed function of ``(seed, e)`` (``torch.randperm`` with a seeded
  generator), identical in every run;
- it is sharded over processes as :class:`~torch.utils.data.DistributedSampler` does (rank ``r`` takes positions
  ``r, r + W, ...``), so ``W`` processes with batch ``B`` see, step by step, the same images as one process with
  batch ``W * B``; Lightning keeps it instead of injecting its own sampler because it *is* a DistributedSampler;
- :class:`ResumableDataLoader` implements ``state_dict`` / ``load_state_dict``, which Lightning stores in every
  checkpoint and restores on ``--ckpt_path``: the position is the number of batches of the epoch whose training
  step completed (Lightning's own count, :func:`track_trained_batches`; a batch in flight when a checkpoint is
  written, e.g. by the SLURM pre-emption handler, is not one of them), and the restarted run skips exactly those;
- every index it yields is a :class:`SampleIndex` carrying ``(seed, epoch)``: datasets that read it
  (:class:`samtune.data.SegmentationDataset`) seed a sample's randomness from ``(seed, epoch, index, rank)``, so
  a sample is the same in the main process or any worker, and in a run resumed mid-epoch; the workers' own seeds
  are a function of ``(seed, epoch)`` too (not a draw from the global generator).

The ``samtune`` CLI applies it to every training loader (the datamodules stay plain).

What the model draws (drop path, dropout) comes from the global generators: :func:`rng_states` /
:func:`restore_rng_states` carry them through a checkpoint (``PromptableSegmentationTask`` stores them and
restores them when training starts, after the sanity-check validation).
"""
from __future__ import annotations

import logging
import random
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

__all__ = ["SampleIndex", "ResumableSampler", "ResumableDataLoader", "make_resumable", "track_trained_batches",
           "rng_states", "restore_rng_states"]

logger = logging.getLogger("samtune")


class SampleIndex(int):
    """A dataset index that names the pass it belongs to: ``sample_key = (seed, epoch)``.

    It is an ``int`` (any dataset can use it as one) and pickles with its key (it reaches DataLoader workers).
    """

    sample_key: tuple[int, int]

    def __new__(cls, value: int, sample_key: tuple[int, int]) -> "SampleIndex":
        index = super().__new__(cls, value)
        index.sample_key = sample_key
        return index

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (int(self), self.sample_key)

    def __repr__(self) -> str:
        return f"SampleIndex({int(self)}, sample_key={self.sample_key})"


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed that is a fixed function of ``(seed, epoch)``."""
    return int(np.random.SeedSequence([seed & (2**64 - 1), epoch]).generate_state(1, np.uint64)[0]) >> 1


class ResumableSampler(DistributedSampler):
    """Epoch-seeded shuffling, sharded over ``num_replicas`` processes, that can start mid-epoch.

    Args:
        dataset: the dataset (only its length is used).
        num_replicas: number of processes W.
        rank: this process.
        seed: base seed; epoch ``e`` uses permutation ``randperm(N, seed + e)``.
        shuffle: False keeps the dataset order.
        drop_last: drop the tail so all ranks get ``floor(N / W)`` samples (otherwise pad by repeating).
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start_index = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self.start_index = self.start_index, 0  # the skip applies to one pass only
        key = (int(self.seed) & (2**64 - 1), int(self.epoch))
        return iter([SampleIndex(i, key) for i in indices[start:]])

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass epoch ``epoch``; a skip set for another epoch (``start_index``) is dropped.

        (Lightning sets the epoch after restoring a loader: when the restored epoch was complete for Lightning,
        e.g. cut short by ``limit_train_batches``, it moves on to the next epoch, which starts at its beginning.)
        """
        if epoch != self.epoch:
            self.start_index = 0
        super().set_epoch(epoch)


class ResumableDataLoader(DataLoader):
    """DataLoader over a :class:`ResumableSampler` that remembers how many batches of the epoch were trained.

    ``state_dict()`` -> ``{"epoch", "batches", "samples", "seed", "num_replicas"}``; ``load_state_dict`` makes the
    next pass resume after those ``samples`` (whatever the resumed run's batch size), or at the start of the next
    epoch when the epoch was complete, in the checkpoint's order: its ``seed`` replaces the sampler's (a run
    resumed with another ``seed_everything`` continues the order and the sample seeds of the run it resumes).

    ``batches`` counts the batches of the current pass whose training step completed: ``trained_batches()`` when
    set (:func:`track_trained_batches` sets it to Lightning's count), capped by the batches handed out; without
    it, the batches handed out (a batch in flight then counts as trained). Before a pass of the sampler's epoch
    has begun, it is the position that pass will start at.

    Each pass seeds the loader's ``generator`` from ``(seed, epoch)``: the workers' seeds (``torch.initial_seed()``
    in a worker) depend on the epoch only, and creating the iterator draws nothing from the global generator
    (a run resumed mid-epoch creates one where the uninterrupted run did not). Persistent workers keep the seeds
    of the epoch they were started in, as DataLoader does.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableSampler):
            raise TypeError(f"ResumableDataLoader needs a ResumableSampler, got {type(self.sampler).__name__}")
        self.trained_batches: Callable[[], int] | None = None
        self._pass_epoch: int | None = None  # epoch of the pass that began last; None: none since (re)loading
        self._handed_out = 0  # batches of that pass handed out (the skipped samples not included)
        self._pass_start = 0  # samples that pass skipped
        self._pass_offset = 0  # Lightning's batch count when that pass began
        self._restored_batches = 0  # the restored position in batches (Lightning's count), with start_index

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        self._pass_epoch = int(sampler.epoch)
        self._pass_start = int(sampler.start_index)  # samples skipped by this pass
        # Lightning's count of this epoch starts at the restored batches (in the checkpoint's batch size)
        self._pass_offset = self._restored_batches if sampler.start_index else 0
        self._handed_out = 0
        self.generator = torch.Generator().manual_seed(_epoch_seed(int(sampler.seed), int(sampler.epoch)))
        for batch in super().__iter__():
            self._handed_out += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        if self._pass_epoch is None or self._pass_epoch != sampler.epoch:
            epoch, samples = int(sampler.epoch), int(sampler.start_index)
            batches = self._restored_batches if samples else 0
        else:
            trained = self._handed_out
            if self.trained_batches is not None:
                trained = max(0, min(trained, int(self.trained_batches()) - self._pass_offset))
            epoch, batches = self._pass_epoch, self._pass_offset + trained
            samples = self._pass_start + trained * (self.batch_size or 1)
        return {"epoch": epoch, "batches": int(batches), "samples": int(samples), "seed": int(sampler.seed),
                "num_replicas": int(sampler.num_replicas)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        if int(state.get("num_replicas", sampler.num_replicas)) != sampler.num_replicas:
            raise ValueError(
                f"the checkpoint's data order was sharded over {state['num_replicas']} processes, this run has "
                f"{sampler.num_replicas}: resume on the same number of processes (or start a new run from the "
                "checkpoint's weights)"
            )
        seed = int(state.get("seed", sampler.seed))
        if seed != sampler.seed:  # e.g. `seed_everything: true`, a new seed at every start
            logger.warning("resuming the data order of the checkpoint (seed %d), not this run's seed %d", seed,
                           sampler.seed)
            sampler.seed = seed
        epoch, batches = int(state["epoch"]), int(state["batches"])
        # The position in samples: a run resumed with another batch size skips what the checkpoint's run trained
        # (checkpoints without "samples" were written with batches of this run's size, as far as can be known).
        samples = int(state.get("samples", batches * (self.batch_size or 1)))
        remaining = sampler.num_samples - samples
        if remaining <= 0 or (self.drop_last and remaining < (self.batch_size or 1)):
            epoch, batches, samples = epoch + 1, 0, 0  # the epoch was complete: the next pass is the next epoch
        sampler.set_epoch(epoch)
        sampler.start_index = samples
        self._restored_batches = batches
        self._pass_epoch = None


def track_trained_batches(trainer: Any) -> None:
    """Make the trainer's :class:`ResumableDataLoader` s count the batches whose training step completed.

    The count is Lightning's ``fit_loop.epoch_loop.batch_progress.current.processed``: the batches of the epoch
    that went through the training step (and the optimizer step, when it was due), the restored ones included. It
    is where Lightning itself resumes: a checkpoint written before the step of the batch in flight completed
    resumes at that batch, one written after (ModelCheckpoint, in ``on_train_batch_end``) at the next. Call it at
    the start of every training epoch (``on_train_epoch_start``), which also covers reloaded loaders.

    Args:
        trainer: a ``lightning.Trainer``; loaders of other kinds are left alone.
    """
    loaders = trainer.train_dataloader
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    elif not isinstance(loaders, (list, tuple)):
        loaders = [loaders]
    for loader in loaders:
        if isinstance(loader, ResumableDataLoader):
            loader.trained_batches = lambda: trainer.fit_loop.epoch_loop.batch_progress.current.processed


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def make_resumable(loader: DataLoader, seed: int) -> DataLoader:
    """The same training loader with a resumable, epoch-seeded, sharded order.

    Args:
        loader: a DataLoader with ``shuffle=True`` (a RandomSampler) and a batch size; anything else (sequential,
            custom samplers, iterable datasets) is returned unchanged.
        seed: seed of the permutations (the run's ``seed_everything``).

    Returns:
        A :class:`ResumableDataLoader` with the same dataset, batch size, workers, collate and pinning (and its own
        per-epoch ``generator``).
    """
    if isinstance(loader, ResumableDataLoader) or not isinstance(loader.sampler, RandomSampler) \
            or loader.batch_size is None:
        return loader
    world, rank = _distributed()
    sampler = ResumableSampler(loader.dataset, num_replicas=world, rank=rank, seed=seed, shuffle=True,
                               drop_last=loader.drop_last and world > 1)
    workers = loader.num_workers
    return ResumableDataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        prefetch_factor=loader.prefetch_factor if workers > 0 else None,
        persistent_workers=loader.persistent_workers if workers > 0 else False,
    )


def rng_states() -> dict[str, Any]:
    """The states of the global generators (torch CPU, every CUDA device, numpy, python), as tensors, ints and
    strings only, so a checkpoint holding them loads with ``torch.load(weights_only=True)``."""
    numpy_state = np.random.get_state(legacy=False)
    version, internal, gauss = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"bit_generator": numpy_state["bit_generator"],
                  "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                  "pos": int(numpy_state["state"]["pos"]), "has_gauss": int(numpy_state["has_gauss"]),
                  "gauss": float(numpy_state["gauss"])},
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the global generators to :func:`rng_states`' ``states``. CUDA states are restored when this process
    has as many devices as the saving one had (otherwise they are left as seeded, with a warning)."""
    torch.set_rng_state(states["torch"])
    numpy_state = states["numpy"]
    np.random.set_state({"bit_generator": numpy_state["bit_generator"],
                         "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
                         "has_gauss": numpy_state["has_gauss"], "gauss": numpy_state["gauss"]})
    python = states["python"]
    random.setstate((python["version"], tuple(int(v) for v in python["internal"].tolist()), python["gauss"]))
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            logger.warning("the checkpoint's CUDA generator states are for %d devices, this process sees %d: the "
                           "CUDA generators stay as seeded (dropout draws differ from the interrupted run's)",
                           len(cuda), torch.cuda.device_count())
